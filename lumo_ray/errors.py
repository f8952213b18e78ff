"""User errors: a problem with what the user gave (an input, a run directory, a config), reported by
`lumo` as one line, `error: <what> (<path>): <why>; <what to do>`, exit 2, no traceback (`--debug` or
LUMO_DEBUG=1 shows it). Anything else is a bug or an environment failure: one line naming the
exception and how to see the traceback, exit 1."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union


class UserError(ValueError):
    """what (path): why; todo."""

    def __init__(self, what: str, path: Union[str, Path, None], why: str, todo: str = ""):
        self.what, self.path, self.why, self.todo = what, str(path) if path is not None else "", why, todo
        where = f" ({self.path})" if self.path else ""
        super().__init__(f"{what}{where}: {why}" + (f"; {todo}" if todo else ""))

    def __reduce__(self):  # pickles with its fields (Ray sends a worker's exception to the driver)
        return (type(self), (self.what, self.path, self.why, self.todo))


# Exceptions of the library that are about the user's input (their messages name the sample, field or
# file). Matched by name along the class hierarchy, so the CLI need not import torch-heavy modules to
# classify what it caught.
_USER_ERROR_NAMES = {
    "UserError", "ConfigError", "ReaderError", "ManifestError", "TokenSpaceError", "TokenSpaceMismatch",
    "MediaError", "VLMInputError", "VLMDataError", "CheckpointError", "SequenceError", "TextDataError",
}


def unwrap(e: BaseException) -> BaseException:
    """The exception a Ray worker raised, out of Ray's wrappers: ray.train.WorkerGroupError keeps each
    rank's as .worker_failures (the lowest rank's is taken), RayTaskError keeps it as .cause."""
    fails = getattr(e, "worker_failures", None)
    if isinstance(fails, dict) and fails:
        return unwrap(sorted(fails.items())[0][1])
    cause = getattr(e, "cause", None)
    return unwrap(cause) if isinstance(cause, BaseException) and cause is not e else e


def is_user_error(e: BaseException) -> bool:
    return any(c.__name__ in _USER_ERROR_NAMES and c.__module__.startswith("lumo_ray") for c in type(e).__mro__)


def one_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (Ray wraps worker errors in long texts)."""
    fails = getattr(e, "worker_failures", None)  # ray.train.WorkerGroupError: {rank: the worker's exception}
    if isinstance(fails, dict) and fails:
        rank, err = sorted(fails.items())[0]
        err = unwrap(err)
        return f"rank {rank}: {type(err).__name__}: {one_line(err)}"
    e = unwrap(e)
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__


# What to do when a Ray cluster wants a token this process does not send (Ray's token authentication,
# docs.ray.io/en/latest/ray-security/token-auth.html): Ray reads RAY_AUTH_TOKEN, then the file named by
# RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token, and sends it only when RAY_AUTH_MODE=token.
RAY_TOKEN_TODO = ("set RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on its head node prints it; "
                  "or RAY_AUTH_TOKEN_PATH to a file holding it) and RAY_AUTH_MODE=token")


def ray_auth_failure(e: BaseException) -> Optional[str]:
    """Ray's refusal of a connection for want of the cluster's token (an AuthenticationError, or the
    ConnectionError ray.init raises from one), as a user error's one line; None for anything else."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    texts = [str(x) for x in chain]
    if not any(type(x).__name__ == "AuthenticationError" or "InvalidAuthToken" in t
               or "Token authentication is enabled" in t for x, t in zip(chain, texts)):
        return None
    addr = next((m.group(1) for t in texts for m in [re.search(r"Ray cluster at (\S+)", t)] if m), None)
    why = ("it uses token authentication and no token is set" if any("no authentication token was found" in t
                                                                        for t in texts)
           else "it uses token authentication and refused this process's token (missing or incorrect)")
    return str(UserError("Ray cluster", addr, why, RAY_TOKEN_TODO))
