"""Building the configured policy: a built-in name, `package.module:Class` or `/file.py:Class`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmux.policies.adaptive import AdaptivePolicy
from llmux.policies.cost_aware import CostAwarePolicy
from llmux.policies.exhaustive import ExhaustivePolicy
from llmux.policies.fifo import FifoPolicy
from llmux.policies.interface import Policy

if TYPE_CHECKING:
    from llmux.config import Config

BUILTIN_POLICIES: dict[str, type] = {
    "adaptive": AdaptivePolicy,
    "fifo": FifoPolicy,
    "exhaustive": ExhaustivePolicy,
    "cost_aware": CostAwarePolicy,
}


class PolicyLoadError(Exception):
    """The configured policy could not be found or built."""


def load_policy(name: str, options: Mapping[str, Any], base_dir: Path) -> Policy:
    """Build the configured policy: a built-in name, `pkg.mod:Class` or `/file.py:Class`."""
    cls = _find_policy_class(name, base_dir)
    try:
        policy = cls(**dict(options))
    except TypeError as exc:
        raise PolicyLoadError(f"policy {name!r} rejected [policy.options]: {exc}") from None
    except ValueError as exc:
        raise PolicyLoadError(f"policy {name!r}: invalid option: {exc}") from None
    except Exception as exc:  # the operator's code: whatever it raises, refuse it, stay up
        raise PolicyLoadError(f"policy {name!r} failed to start: {exc!r}") from None
    if not callable(getattr(policy, "decide", None)):
        raise PolicyLoadError(f"policy {name!r} has no decide(event, snapshot) method")
    return policy


def policy_factory(config: Config) -> Callable[[], Policy]:
    """Builds the configured policy anew: each group gets an instance of its own."""
    policy = config.policy
    return lambda: load_policy(policy.name, policy.options, config.hook_dir)


def _find_policy_class(name: str, base_dir: Path) -> type:
    if name in BUILTIN_POLICIES:
        return BUILTIN_POLICIES[name]
    location, sep, class_name = name.rpartition(":")
    if not sep or not location or not class_name:
        known = ", ".join(sorted(BUILTIN_POLICIES))
        raise PolicyLoadError(
            f"unknown policy {name!r}: use a built-in ({known}), 'package.module:Class' "
            "or '/path/to/file.py:Class'"
        )
    if location.endswith(".py"):
        module = _import_file(base_dir / location)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as exc:
            raise PolicyLoadError(f"cannot import policy module {location!r}: {exc}") from None
        except Exception as exc:  # the module's own code failed while importing
            problem = f"policy module {location!r} failed to import: {exc!r}"
            raise PolicyLoadError(problem) from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise PolicyLoadError(f"policy class {class_name!r} not found in {location!r}")
    return cls


def _import_file(path: Path) -> Any:
    """Import a policy from a file: the one-file binary has no site-packages to install into."""
    path = path.resolve()
    if not path.is_file():
        raise PolicyLoadError(f"policy file {path} not found")
    module_name = f"llmux_policy_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PolicyLoadError(f"cannot load policy file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise PolicyLoadError(f"policy file {path} failed to import: {exc!r}") from None
    return module
