"""The tracking store's tools for people: the MLflow UI, and a team server's accounts and
experiments (MLflow's basic-auth app; the admin's login in MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD). Runs are logged by pipeline/tracking.py alone.

    python -m pipeline.tracking_admin [--port 5000]           # = make ui
    python -m pipeline.tracking_admin experiments [NAME ...]  # team server: create as admin
    python -m pipeline.tracking_admin user NAME [--writer | --reader]   # password asked
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from pipeline.errors import run_stage
from pipeline.tracking import (
    SUMMARY_EXPERIMENT,
    TrackingError,
    first_line,
    refusal,
    tracking_uri,
)

WRITERS_ROLE = "writers"  # a team server's role that logs runs (EDIT) and deletes none
T = TypeVar("T")


def _team_server(command: str) -> Any:
    """The admin client of the tracking server in MLFLOW_TRACKING_URI (basic-auth app); the
    admin's login comes from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        raise TrackingError(f"`{command}` manages a team tracking server: set "
                            f"MLFLOW_TRACKING_URI to its address (now {uri})")
    with warnings.catch_warnings():  # importing mlflow.server warns about starlette's future
        warnings.simplefilter("ignore")
        from mlflow.server.auth.client import AuthServiceClient

    return AuthServiceClient(uri)


def _admin(action: Callable[[], T], what: str) -> T:
    """One call of an admin command: a refusal or a failure as one line, never retried."""
    from mlflow.exceptions import MlflowException

    try:
        return action()
    except (MlflowException, OSError) as exc:
        raise TrackingError(refusal(exc, what) or f"MLflow server {tracking_uri()} failed "
                            f"to {what}: {first_line(exc)}") from exc


def _new_password(name: str) -> str:
    """From the terminal, typed twice and not shown; else the first line of stdin (a
    pipe or a file: never a command-line argument, which `ps` shows every local user)."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    password = getpass.getpass(f"password for {name} (12 characters or more): ")
    if getpass.getpass("the same again: ") != password:
        raise TrackingError(f"the two passwords differ; user '{name}' not created")
    return password


def _user_exists(client: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_user(name)
        return True
    except MlflowException as exc:
        if exc.get_http_status_code() == 404:
            return False
        raise


def _writers_role(client: Any) -> int:
    """The role that may log runs in every experiment (EDIT) but delete none (MANAGE),
    created on first use."""
    from mlflow.utils.workspace_utils import DEFAULT_WORKSPACE_NAME

    for role in client.list_roles(DEFAULT_WORKSPACE_NAME):
        if role.name == WRITERS_ROLE:
            return role.id
    role = client.create_role(DEFAULT_WORKSPACE_NAME, WRITERS_ROLE,
                              "log runs in every experiment, delete none")
    client.add_role_permission(role.id, "experiment", "*", "EDIT")
    return role.id


def set_user(name: str, writer: bool | None) -> str:
    """Create user `name` on the team server if new, then make it a writer (True), a
    reader (False) or leave its role (None). Says what it did."""
    client = _team_server("user")
    done = "exists"
    if not _admin(lambda: _user_exists(client, name), f"look up user '{name}'"):
        password = _new_password(name)
        _admin(lambda: client.create_user(name, password), f"create user '{name}'")
        done = "created"
    role = _admin(lambda: _writers_role(client), f"set up the role '{WRITERS_ROLE}'")
    roles = {r.id for r in _admin(lambda: client.list_user_roles(name), f"list {name}'s roles")}
    if writer and role not in roles:
        _admin(lambda: client.assign_role(name, role), f"make '{name}' a writer")
    elif writer is False and role in roles:
        _admin(lambda: client.unassign_role(name, role), f"make '{name}' a reader")
    is_writer = role in roles if writer is None else writer
    return f"user {name}: {done}, {'writer (EDIT)' if is_writer else 'reader'}"


def create_experiments(names: list[str]) -> list[str]:
    """Create those of the team's experiments that do not exist yet (default: one per
    corpus of params.yaml, and the summary), owned by the signed-in admin: writers then
    log into them with EDIT, and only an admin can delete their runs."""
    import mlflow

    from pipeline.params import read_params

    _team_server("experiments")
    mlflow.set_tracking_uri(tracking_uri())
    said = []
    for name in names or [*read_params()["corpora"], SUMMARY_EXPERIMENT]:
        if _admin(lambda n=name: mlflow.get_experiment_by_name(n), f"look up '{name}'"):
            said.append(f"experiment {name}: exists")
        else:
            _admin(lambda n=name: mlflow.create_experiment(n), f"create experiment '{name}'")
            said.append(f"experiment {name}: created")
    return said


def ui(port: int) -> None:
    """Serve the MLflow UI on the tracking store, on the loopback interface only."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        print(f"MLFLOW_TRACKING_URI is a tracking server: open {uri} in a browser")
        return
    cmd = ["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port)]
    print(" ".join(cmd))
    os.execvp(cmd[0], cmd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="The MLflow UI on the tracking store (make ui); with a command, the "
        "accounts and experiments of a team tracking server (README).")
    parser.add_argument("--port", type=int, default=5000, help="the UI's port")
    commands = parser.add_subparsers(dest="command", metavar="{user,experiments}")
    user = commands.add_parser("user", help="create an account (password asked, or read "
                               "from stdin) and set its role; the default role is reader")
    user.add_argument("name")
    role = user.add_mutually_exclusive_group()
    role.add_argument("--writer", dest="writer", action="store_const", const=True,
                      help="may log runs in every experiment (EDIT), delete none")
    role.add_argument("--reader", dest="writer", action="store_const", const=False,
                      help="may read every experiment (the server's default_permission)")
    experiments = commands.add_parser("experiments", help="create the team's experiments, "
                                      "owned by the admin (default: every corpus of "
                                      "params.yaml, and summary)")
    experiments.add_argument("names", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "user":
        print(set_user(args.name, args.writer))
    elif args.command == "experiments":
        print("\n".join(create_experiments(args.names)))
    else:
        ui(args.port)


if __name__ == "__main__":
    run_stage(main)
