"""ZeRO: optimizer states (stage 1), gradients (stage 2) and parameters (stage 3) sharded over the
data-parallel group, optionally with the optimizer offloaded to the CPU or NVMe.

``stage12.ZeroStrategy`` and ``stage3.Stage3Strategy`` are ``GradStrategy`` implementations
(``gigatrain.parallel.strategy``; ``build_grad_strategy`` picks one). ``shards`` holds what they
share: the flat layout, the optimizer pieces and the name-keyed state codec; ``offload`` the host
update; ``memory.model_state_bytes`` is the matching memory formula.
"""
