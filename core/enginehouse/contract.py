"""The plugin contract's version, the check of what a plugin declares, and deprecations.

The hook specifications (hookspecs.py), the runner contract (runner.py) and the names of
`enginehouse.plugin_api` together are the contract, versioned as `CONTRACT_VERSION` (semver):
a new major breaks plugins written for the last one, a new minor only adds (and may deprecate).
A plugin says which version it was written for with a module attribute on the module its
entry point names::

    ENGINEHOUSE_CONTRACT = "1.0"

`check_declared` refuses a plugin of another major version at load (naming the plugin, its
version and the core's) and warns about one that declares nothing. `deprecated` is how a hook
or field that is going away keeps working for one more minor version, with a warning naming
what replaces it. docs/plugins.md "Contract versions and deprecations" states the policy and
docs/contract-changelog.md lists the versions.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

from .errors import PluginLoadError

log = logging.getLogger(__name__)

CONTRACT_VERSION = "1.0.0"
DECLARATION = "ENGINEHOUSE_CONTRACT"  # the module attribute a plugin sets
_VERSION = re.compile(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?")


class ContractDeprecationWarning(FutureWarning):
    """A plugin uses something the contract deprecates, or declares no contract version.

    A FutureWarning, not a DeprecationWarning: Python hides the latter outside `__main__`,
    and plugin users (not only plugin authors) should see that a plugin will stop working."""


def parse_version(text: str) -> tuple[int, int, int]:
    """'1', '1.2' or '1.2.3' as (major, minor, patch); ValueError for anything else."""
    m = _VERSION.fullmatch(str(text).strip())
    if m is None:
        raise ValueError(f"{text!r} is not a contract version; write it as '1.0' (major.minor)")
    return int(m[1]), int(m[2] or 0), int(m[3] or 0)


CORE = parse_version(CONTRACT_VERSION)


def check_declared(module: Any, label: str, core: str = CONTRACT_VERSION) -> str | None:
    """The contract version `module` (a plugin, named `label` in messages) declares, checked
    against the core's `core`; None when it declares none (a ContractDeprecationWarning then).

    Raises PluginLoadError for another major version, or a declaration that is not a version.
    """
    declared = getattr(module, DECLARATION, None)
    if declared is None:
        warnings.warn(
            f"plugin {label} declares no contract version; it is loaded as if written for "
            f"{core}, and a plugin without {DECLARATION} will be refused from contract 2.0: "
            f"set {DECLARATION} = {'.'.join(core.split('.')[:2])!r} in the module its entry "
            "point names, once it works with this version",
            ContractDeprecationWarning,
            stacklevel=2,
        )
        return None
    try:
        mine = parse_version(declared)
    except ValueError as e:
        raise PluginLoadError(f"plugin {label}: {DECLARATION} = {declared!r}: {e}") from None
    theirs = parse_version(core)
    if mine[0] != theirs[0]:
        newer = "a newer" if mine[0] > theirs[0] else "an older"
        fix = "upgrade enginehouse" if mine[0] > theirs[0] else "upgrade the plugin"
        raise PluginLoadError(
            f"plugin {label} was written for enginehouse plugin contract {declared}, and this "
            f"enginehouse implements contract {core}: {newer} major version, whose hooks "
            f"differ; {fix}, or uninstall the plugin (docs/plugins.md, 'Contract versions "
            "and deprecations')"
        )
    if mine[1] > theirs[1]:
        log.warning(
            "plugin %s was written for contract %s, newer than this enginehouse's %s: hooks "
            "added since are not called; upgrade enginehouse",
            label,
            declared,
            core,
        )
    return str(declared)


# Deprecated hooks: name -> (replacement, since, removed_in). A plugin implementing one is
# warned when it registers (PluginHost.register); the core keeps calling the hook until then.
DEPRECATED_HOOKS: dict[str, tuple[str, str, str]] = {}

_warned: set[str] = set()


def warn_deprecated_hooks(label: str, hooks: list[str]) -> None:
    """Warn for each hook of `hooks` (a plugin's, named `label`) that is deprecated."""
    for hook in hooks:
        if hook in DEPRECATED_HOOKS:
            replacement, since, removed_in = DEPRECATED_HOOKS[hook]
            deprecated(f"the {hook} hook (plugin {label})", replacement, since, removed_in)


def deprecated(what: str, replacement: str, since: str, removed_in: str) -> None:
    """Warn (once per process) that `what` is deprecated since contract `since` and goes in
    `removed_in`; `replacement` says what to use instead. The caller keeps `what` working."""
    if what in _warned:
        return
    _warned.add(what)
    warnings.warn(
        f"{what} is deprecated since enginehouse plugin contract {since} and will be removed "
        f"in {removed_in}; use {replacement} instead (docs/contract-changelog.md)",
        ContractDeprecationWarning,
        stacklevel=3,
    )
