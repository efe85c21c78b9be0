"""Flows: ``safe_flow``, Prefect's ``@flow`` that refuses credentials in parameters before Prefect stores them.

Prefect writes a flow run's parameters into its database when it creates the run: on a direct call
(``extract_features(...)`` from Python, a subflow call) that happens inside ``Flow.__call__``, before the
flow's body runs, so a check in the body comes too late. A ``CredentialSafeFlow`` checks them first: in
``__call__`` (before anything else, subflows included), in ``serialize_parameters`` (the step right before
``create_flow_run`` in Prefect 3's engine, whatever path led there) and in the ways a flow is deployed from
Python (``to_deployment``, ``deploy``, ``serve``). ``with_options`` keeps the class. Credentials are found
by ``infra.credentials`` at any depth and named by key path, never by value.

Runs of a deployment arrive with parameters the server already holds; those are refused at deploy time
(``infra/serve.py``, ``infra/prefect.yaml``) and again by the flow body.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from prefect import Flow

from audiopipe.infra.credentials import refuse_credential_parameters


class CredentialSafeFlow(Flow):
    """A Prefect ``Flow`` whose parameters are checked for credentials before any of them is stored."""

    def __call__(self, *args: Any, return_state: bool = False, wait_for: Any = None, **kwargs: Any) -> Any:
        try:
            bound = inspect.signature(self.fn).bind_partial(*args, **kwargs).arguments
        except TypeError:  # a wrong call: Prefect reports it in its own words, nothing is stored
            bound = {}
        refuse_credential_parameters(bound, self.name)
        return super().__call__(*args, return_state=return_state, wait_for=wait_for, **kwargs)

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        refuse_credential_parameters(parameters, self.name)
        return super().serialize_parameters(parameters)

    def with_options(self, **kwargs: Any) -> CredentialSafeFlow:
        new = super().with_options(**kwargs)
        new.__class__ = type(self)  # Prefect builds a plain Flow; the copy must keep the check
        return new

    def to_deployment(self, *args: Any, **kwargs: Any) -> Any:
        refuse_credential_parameters(kwargs.get("parameters") or {}, self.name)
        return super().to_deployment(*args, **kwargs)

    async def ato_deployment(self, *args: Any, **kwargs: Any) -> Any:
        refuse_credential_parameters(kwargs.get("parameters") or {}, self.name)
        return await super().ato_deployment(*args, **kwargs)

    def serve(self, *args: Any, **kwargs: Any) -> Any:
        refuse_credential_parameters(kwargs.get("parameters") or {}, self.name)
        return super().serve(*args, **kwargs)


def safe_flow(**options: Any) -> Callable[[Callable[..., Any]], CredentialSafeFlow]:
    """``@safe_flow(name=..., ...)``: as ``@prefect.flow(...)``, with the credential check of ``CredentialSafeFlow``."""

    def decorate(fn: Callable[..., Any]) -> CredentialSafeFlow:
        return CredentialSafeFlow(fn=fn, **options)

    return decorate
