"""Route vLLM's ``merge_attn_states`` to attnmerge: one call, reversible, logged.

::

    import attnmerge.integrations.vllm as attnmerge_vllm

    handle = attnmerge_vllm.install()  # or install(backend="cuda"); idempotent
    ...                                 # vLLM's merges now run attnmerge.merge_attn_states
    handle.restore()                    # or attnmerge_vllm.uninstall(): vLLM's own again

:func:`install` imports the modules named in :data:`TARGETS` and replaces these
functions (as read in vLLM 0.34.0, whose signatures are attnmerge's: the same eight
parameters, names, order and defaults):

* ``vllm.v1.attention.ops.merge_attn_states.merge_attn_states``, vLLM's Python dispatcher
  (it picks vLLM's CUDA op, its Triton kernel, or its torch code on a CPU);
* ``vllm._custom_ops.merge_attn_states``, the wrapper of vLLM's CUDA op
  ``torch.ops._C.merge_attn_states``;
* every other module-level name bound to one of these two function objects, found by
  scanning ``sys.modules``: the modules that ran ``from
  vllm.v1.attention.ops.merge_attn_states import merge_attn_states`` before
  :func:`install` (in vLLM 0.34.0 the FlashAttention, FlashInfer and ROCm AITER FA
  backends, the MLA and sparse MLA attention layers and Kimi K3's MLA). A module imported
  later binds the replacement, since the defining module holds it.

Each replacement takes the arguments of the function it replaces and calls
:func:`attnmerge.merge_attn_states` with them and the installed ``backend``. It hands a
call back to the function it replaced (logging why, at INFO on the ``attnmerge`` logger,
once per reason) when attnmerge cannot serve it: when attnmerge's checks refuse the
arguments (``TypeError``/``ValueError``, raised before anything is written: e.g. FP8
partials or a ``float8_e4m3fnuz`` output, which vLLM's Triton kernel takes), when an
explicitly named backend cannot serve it (:class:`attnmerge.BackendError`), or when the
call passes an argument that attnmerge does not take (a parameter a later vLLM may add;
parameters are mapped by name through ``_NAMES``, the identity at 0.34.0). While such a
call runs, the replacements on that thread call vLLM's functions (vLLM's dispatcher
calls ``vllm._custom_ops.merge_attn_states``). Under ``torch.compile`` a replacement
traces into attnmerge's custom op, and what attnmerge refuses raises there.

:func:`uninstall` (or ``Installation.restore()``) puts the original function objects
back in every attribute that holds a replacement, including those of modules imported
after :func:`install`; an attribute that something else replaced in between is left
alone (with a warning). A replacement that is still referenced elsewhere (a closure, a
``functools.partial``) calls vLLM's function once uninstalled. Both functions log what
they changed, once, at INFO on the ``attnmerge`` logger, and take a lock: concurrent
calls from several threads patch and restore once.

Not covered: references to the functions kept in other places than module attributes
(class attributes, containers, partials created before :func:`install`) and vLLM's
Triton function ``vllm.v1.attention.ops.triton_merge_attn_states.merge_attn_states``,
which only the dispatcher calls. vLLM runs attention in worker processes:
:func:`install` must run in each (docs/integration.md shows a vLLM plugin that does).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..api import merge_attn_states as _merge
from ..dispatch import BACKENDS, BackendError

__all__ = ["TARGETS", "TESTED_VLLM_VERSION", "Installation", "install", "installed", "uninstall"]

logger = logging.getLogger("attnmerge")

#: The functions :func:`install` replaces: (module, attribute), imported in this order.
TARGETS: tuple[tuple[str, str], ...] = (
    ("vllm.v1.attention.ops.merge_attn_states", "merge_attn_states"),
    ("vllm._custom_ops", "merge_attn_states"),
)

#: The vLLM release whose modules the tests patch (tests/test_integration_vllm.py).
TESTED_VLLM_VERSION = "0.34.0"

#: attnmerge.merge_attn_states' parameters, in order; the first five are required.
_PARAMETERS = (
    "output",
    "prefix_output",
    "prefix_lse",
    "suffix_output",
    "suffix_lse",
    "output_lse",
    "prefill_tokens_with_context",
    "output_scale",
)
_REQUIRED = _PARAMETERS[:5]
#: vLLM's name of each parameter -> attnmerge's (the same names in vLLM 0.34.0).
_NAMES: dict[str, str] = {name: name for name in _PARAMETERS}
#: What attnmerge raises, before writing anything, for a call it cannot serve.
_REFUSALS = (TypeError, ValueError, BackendError)
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


class _ThreadState(threading.local):
    bypass = 0  # > 0 while a call handed back to vLLM runs on this thread


_lock = threading.RLock()
_local = _ThreadState()
_is_compiling = torch.compiler.is_compiling
_logged: set[tuple[str, str]] = set()
_active: Installation | None = None


@dataclass
class _Patch:
    module: types.ModuleType
    name: str
    original: Callable[..., Any]
    replacement: Callable[..., Any]

    @property
    def label(self) -> str:
        return f"{getattr(self.module, '__name__', '?')}.{self.name}"


class Installation:
    """What :func:`install` did. ``restore()`` undoes it (as :func:`uninstall`); also a
    context manager (``with install(): ...``)."""

    def __init__(self, backend: str) -> None:
        self._backend = backend
        self._active = True
        self._patches: list[_Patch] = []
        # id(original) -> (original, replacement); id(replacement) -> (replacement, original)
        self._replacement_of: dict[int, tuple[Callable[..., Any], Callable[..., Any]]] = {}
        self._original_of: dict[int, tuple[Callable[..., Any], Callable[..., Any]]] = {}

    @property
    def backend(self) -> str:
        """The attnmerge backend the replacements call."""
        return self._backend

    @property
    def active(self) -> bool:
        """True until :meth:`restore` or :func:`uninstall`."""
        return self._active

    @property
    def patched(self) -> tuple[str, ...]:
        """The attributes replaced (``module.name``), in the order they were patched."""
        return tuple(p.label for p in self._patches)

    def restore(self) -> None:
        """Put vLLM's functions back (nothing if already done)."""
        with _lock:
            if _active is self:
                uninstall()

    def __enter__(self) -> Installation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def __repr__(self) -> str:
        state = "active" if self._active else "restored"
        return (
            f"<attnmerge vLLM installation ({state}, backend={self._backend!r}): "
            f"{', '.join(self.patched)}>"
        )

    def _add(self, original: Callable[..., Any], replacement: Callable[..., Any]) -> None:
        self._replacement_of[id(original)] = (original, replacement)
        self._original_of[id(replacement)] = (replacement, original)

    def _patch_bindings(self) -> list[str]:
        """Replace every module attribute bound to an original; the new labels."""
        new = []
        for module in _modules():
            for name, original in _bindings(module, self._replacement_of):
                replacement = self._replacement_of[id(original)][1]
                setattr(module, name, replacement)
                patch = _Patch(module, name, original, replacement)
                self._patches.append(patch)
                new.append(patch.label)
        return new


def _modules() -> list[types.ModuleType]:
    return [m for m in list(sys.modules.values()) if isinstance(m, types.ModuleType)]


def _bindings(
    module: types.ModuleType, objects: dict[int, tuple[Callable[..., Any], Any]]
) -> list[tuple[str, Callable[..., Any]]]:
    """The names in ``module``'s namespace bound to one of ``objects`` (by identity)."""
    try:
        namespace = vars(module)
    except TypeError:
        return []
    found = []
    for name, value in list(namespace.items()):
        entry = objects.get(id(value))
        if entry is not None and entry[0] is value:
            found.append((name, value))
    return found


def _plan(original: Callable[..., Any]) -> tuple[inspect.Signature | None, str | None]:
    """vLLM's signature, or why a call of ``original`` cannot be mapped to attnmerge."""
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError) as exc:
        return None, f"its signature cannot be read ({exc})"
    params = signature.parameters
    mapped = {_NAMES[n] for n, p in params.items() if n in _NAMES and p.kind not in _VARIADIC}
    missing = [n for n in _REQUIRED if n not in mapped]
    if missing:
        return None, f"it takes no {', '.join(missing)}"
    extra = [
        n
        for n, p in params.items()
        if n not in _NAMES and p.kind not in _VARIADIC and p.default is p.empty
    ]
    if extra:
        return None, f"it requires {', '.join(extra)}, which attnmerge does not take"
    return signature, None


def _is_attnmerge_signature(signature: inspect.Signature) -> bool:
    params = list(signature.parameters.values())
    return (
        [p.name for p in params] == list(_PARAMETERS)
        and all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
        and all(p.default is p.empty for p in params[:5])
        and all(p.default is None for p in params[5:])
    )


def _hand_back(
    label: str, reason: str, original: Callable[..., Any], args: tuple, kwargs: dict
) -> Any:
    """Run vLLM's ``original`` for this call, logging ``reason`` once."""
    key = (label, re.sub(r"\d+", "N", reason))
    if key not in _logged:
        with _lock:
            if key not in _logged:
                _logged.add(key)
                logger.info("attnmerge: %s hands calls back to vLLM when %s", label, reason)
    _local.bypass += 1
    try:
        return original(*args, **kwargs)
    finally:
        _local.bypass -= 1


def _replacement(
    installation: Installation,
    label: str,
    original: Callable[..., Any],
    signature: inspect.Signature,
) -> Callable[..., Any]:
    """A function with ``original``'s parameters that calls attnmerge."""
    if _is_attnmerge_signature(signature):

        def merge_attn_states(
            output,
            prefix_output,
            prefix_lse,
            suffix_output,
            suffix_lse,
            output_lse=None,
            prefill_tokens_with_context=None,
            output_scale=None,
        ):
            args = (
                output,
                prefix_output,
                prefix_lse,
                suffix_output,
                suffix_lse,
                output_lse,
                prefill_tokens_with_context,
                output_scale,
            )
            if _is_compiling():
                _merge(*args, backend=installation._backend)
                return None
            if not installation._active or _local.bypass:
                return original(*args)
            try:
                _merge(*args, backend=installation._backend)
            except _REFUSALS as exc:
                return _hand_back(label, f"attnmerge refuses the call: {exc}", original, args, {})
            return None

    else:

        def merge_attn_states(*args, **kwargs):
            compiling = _is_compiling()
            if not compiling and (not installation._active or _local.bypass):
                return original(*args, **kwargs)
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return original(*args, **kwargs)  # vLLM's own error
            given = {}
            for name, value in bound.arguments.items():
                param = signature.parameters[name]
                if param.kind in _VARIADIC:
                    unused = len(value) == 0  # *args / **kwargs
                elif name in _NAMES:
                    given[_NAMES[name]] = value
                    continue
                else:
                    unused = value is None or value is param.default
                if not unused:
                    reason = f"it is passed {name}, which attnmerge does not take"
                    return _hand_back(label, reason, original, args, kwargs)
            if compiling:
                _merge(**given, backend=installation._backend)
                return None
            try:
                _merge(**given, backend=installation._backend)
            except _REFUSALS as exc:
                reason = f"attnmerge refuses the call: {exc}"
                return _hand_back(label, reason, original, args, kwargs)
            return None

        merge_attn_states.__signature__ = signature  # type: ignore[attr-defined]

    merge_attn_states.__name__ = getattr(original, "__name__", "merge_attn_states")
    merge_attn_states.__qualname__ = getattr(original, "__qualname__", "merge_attn_states")
    merge_attn_states.__doc__ = (
        f"{label}, routed to attnmerge.merge_attn_states by attnmerge.integrations.vllm "
        f"(the original: __wrapped__)."
    )
    merge_attn_states.__wrapped__ = original  # type: ignore[attr-defined]
    return merge_attn_states


def install(*, backend: str = "auto") -> Installation:
    """Route vLLM's ``merge_attn_states`` to attnmerge (module docstring: what is
    replaced, when a call is handed back to vLLM).

    Idempotent: while installed, a call returns the same :class:`Installation`, patches
    any module attribute bound to vLLM's functions since, and switches the backend if
    another is given.

    Args:
        backend: the attnmerge backend the calls use: ``"auto"`` (default; the
            ``ATTNMERGE_BACKEND`` environment variable applies), ``"cuda"``,
            ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: an unknown ``backend``.
        ImportError: none of :data:`TARGETS` could be imported and replaced (the message
            says why, e.g. vLLM is not installed).
    """
    global _active
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    with _lock:
        if _active is not None:
            installation = _active
            if backend != installation._backend:
                installation._backend = backend
                logger.info("attnmerge: vLLM's merge_attn_states now uses backend %r", backend)
            new = installation._patch_bindings()
            if new:
                logger.info("attnmerge: also routed to attnmerge: %s", ", ".join(new))
            return installation

        installation = Installation(backend)
        skipped: list[str] = []
        error: ImportError | None = None
        for module_name, attribute in TARGETS:
            label = f"{module_name}.{attribute}"
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                skipped.append(f"{label} (import failed: {exc})")
                error = error or exc
                continue
            original = vars(module).get(attribute)
            if not callable(original):
                skipped.append(f"{label} (not found)")
                continue
            signature, reason = _plan(original)
            if signature is None:
                skipped.append(f"{label} ({reason})")
                continue
            installation._add(original, _replacement(installation, label, original, signature))
        if not installation._replacement_of:
            raise ImportError(
                f"attnmerge.integrations.vllm: nothing to patch: {'; '.join(skipped)}"
            ) from error
        installation._patch_bindings()
        _active = installation
        version = getattr(sys.modules.get("vllm"), "__version__", "of unknown version")
        if version != TESTED_VLLM_VERSION:
            version = f"{version} (tested: {TESTED_VLLM_VERSION})"
        not_patched = f"; not patched: {'; '.join(skipped)}" if skipped else ""
        logger.info(
            "attnmerge: vLLM %s: merge_attn_states routed to attnmerge (backend %r): %s%s",
            version,
            backend,
            ", ".join(installation.patched),
            not_patched,
        )
        return installation


def uninstall() -> bool:
    """Put vLLM's functions back in every attribute that holds a replacement; False if
    nothing was installed."""
    global _active
    with _lock:
        installation = _active
        if installation is None:
            return False
        restored, left = [], []
        for patch in installation._patches:
            if vars(patch.module).get(patch.name) is patch.replacement:
                setattr(patch.module, patch.name, patch.original)
                restored.append(patch.label)
            else:
                left.append(patch.label)
        # modules that bound a replacement after install()
        for module in _modules():
            for name, replacement in _bindings(module, installation._original_of):
                setattr(module, name, installation._original_of[id(replacement)][1])
                restored.append(f"{getattr(module, '__name__', '?')}.{name}")
        installation._active = False
        _active = None
        logger.info("attnmerge: vLLM's merge_attn_states restored: %s", ", ".join(restored))
        if left:
            logger.warning(
                "attnmerge: left as found (changed since install()): %s", ", ".join(left)
            )
        return True


def installed() -> Installation | None:
    """The active :class:`Installation`, or None."""
    return _active
