"""Registration of the "macfleet" torch.distributed backend, on `import macfleet`, without torch.

`dist.init_process_group("macfleet")` only needs the name in torch's backend table; the engine
(pyzmq, sockets, threads) is needed once a group is created. So `import macfleet` calls
`install()`: if torch.distributed is loaded, the name is registered at once; if not, an import
hook registers it the moment torch.distributed finishes loading (`import torch` loads it). Either
way `import macfleet` itself imports neither torch nor pyzmq, so the `macfleet` CLI stays light.
The registered creator imports macfleet.comm.backend (and with it the engine) on first use.
"""

from __future__ import annotations

import sys

BACKEND_NAME = "macfleet"
DEVICES = ["cpu", "cuda", "mps"]


def _create(store, rank, world_size, timeout):
    from macfleet.comm.backend import create_process_group

    return create_process_group(store, rank, world_size, timeout)


def register(dist) -> None:
    """Register "macfleet" in the torch.distributed module `dist` (idempotent)."""
    if not dist.is_available() or BACKEND_NAME.upper() in dist.Backend._plugins:
        return
    dist.Backend.register_backend(BACKEND_NAME, _create, devices=DEVICES)


class _RegisterAfterImport:
    """sys.meta_path finder: lets the other finders find torch.distributed, registers once it has run."""

    def find_spec(self, name, path, target=None):
        if name != "torch.distributed":
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                break
        else:
            return None
        # The loader is this spec's own instance, so wrapping its exec_module touches nothing else.
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register(module)

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Make "macfleet" a known backend now, or as soon as torch.distributed is imported."""
    if "torch.distributed" in sys.modules:
        register(sys.modules["torch.distributed"])
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
