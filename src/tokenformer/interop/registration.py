"""Register ``tokenformer`` with transformers' Auto classes without importing transformers.

Importing transformers' model code takes seconds, more than ``import tokenformer`` itself, so
registration waits for the moment transformers loads its Auto mappings: the config class when
``AutoConfig``'s module is imported, the model classes when that of ``AutoModel`` and
``AutoModelForCausalLM`` is (it loads the same code then anyway). If they are already loaded,
registration happens at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable


def _register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    from ..configuration_tokenformer import MODEL_TYPE, TokenformerHFConfig

    AutoConfig.register(MODEL_TYPE, TokenformerHFConfig, exist_ok=True)


def _register_model() -> None:
    from transformers.models.auto.modeling_auto import AutoModel, AutoModelForCausalLM

    from ..configuration_tokenformer import TokenformerHFConfig
    from ..modeling_tokenformer import TokenformerForCausalLM, TokenformerModel

    AutoModel.register(TokenformerHFConfig, TokenformerModel, exist_ok=True)
    AutoModelForCausalLM.register(TokenformerHFConfig, TokenformerForCausalLM, exist_ok=True)


HOOKS: dict[str, Callable[[], None]] = {
    "transformers.models.auto.configuration_auto": _register_config,
    "transformers.models.auto.modeling_auto": _register_model,
}


def _run(hook: Callable[[], None]) -> None:
    try:
        hook()
    except Exception as exc:  # an incompatible transformers must not break importing it
        warnings.warn(
            f"tokenformer could not register with transformers ({exc}); its Auto classes will not know 'tokenformer'",
            stacklevel=2,
        )


class _Loader(importlib.abc.Loader):
    """Runs a module's own loader, then the hook waiting for it."""

    def __init__(self, loader: importlib.abc.Loader, hook: Callable[[], None]) -> None:
        self.loader, self.hook = loader, hook

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _run(self.hook)

    def __getattr__(self, name: str):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self.loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of each watched module once."""

    def __init__(self, hooks: dict[str, Callable[[], None]]) -> None:
        self.hooks = dict(hooks)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            spec.loader = _Loader(spec.loader, self.hooks.pop(fullname))
        if not self.hooks and self in sys.meta_path:
            sys.meta_path.remove(self)
        return spec


def install() -> None:
    """Register now what transformers has loaded, and the rest when it loads it."""
    if any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        return
    if "transformers" not in sys.modules and importlib.util.find_spec("transformers") is None:
        return
    pending = {}
    for name, hook in HOOKS.items():
        if name in sys.modules:
            _run(hook)
        else:
            pending[name] = hook
    if pending:
        sys.meta_path.insert(0, _AfterImport(pending))
