"""What a request's tools mean for its job (prompt, schema, stops) and for its answer (a parser)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from edge.tools.functions import (
    CLOSE,
    Function,
    Turn,
    call_schema,
    check_functions,
    names_of,
)
from edge.tools.parser import ToolParser
from edge.tools.prompt import render, system_section
from schemas.errors import InvalidRequest
from schemas.jobs import MAX_SCHEMA_DEPTH, ChatMessage, json_depth

Choice = Literal["none", "auto", "required"]


@dataclass(frozen=True, slots=True)
class Plan:
    """What a request's tools mean for its job and its answer.

    ``choice`` is ``none``, ``auto``, ``required``, or the name of the one function to call.
    """

    functions: tuple[Function, ...]
    choice: str = "auto"
    parallel: bool = True

    @classmethod
    def of(
        cls,
        functions: Sequence[Function],
        choice: str | None,
        parallel: bool | None,
        *,
        param: str = "tools",
        choice_param: str = "tool_choice",
    ) -> Plan | None:
        """The checked plan, or None when the request has no tools (and needs none)."""
        check_functions(functions, param)
        if not functions:
            if choice not in (None, "none", "auto"):
                what = "required" if choice == "required" else f"the function '{choice}'"
                raise InvalidRequest(
                    f"tool_choice asks for {what} but the request has no tools", param=choice_param
                )
            return None
        if choice not in (None, "none", "auto", "required") and choice not in names_of(functions):
            raise InvalidRequest(
                f"tool_choice names the function '{choice}', which is not in tools",
                param=choice_param,
            )
        plan = cls(tuple(functions), choice or "auto", True if parallel is None else parallel)
        forced = plan.json_schema()
        if forced is not None and json_depth(forced, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
            raise InvalidRequest(
                f"the tools' parameters nest too deeply: a required call's schema (the "
                f"parameters inside a name-and-arguments object) may nest at most "
                f"{MAX_SCHEMA_DEPTH} levels",
                param=param,
            )
        return plan

    @property
    def forced(self) -> tuple[Function, ...]:
        """The functions the grammar allows (none unless a call is required)."""
        if self.choice == "required":
            return self.functions
        return tuple(f for f in self.functions if f.name == self.choice)

    def messages(self, turns: Sequence[Turn]) -> list[ChatMessage]:
        """The turns as chat messages, with the tools section unless ``tool_choice`` is none."""
        section = (
            None
            if self.choice == "none"
            else system_section(self.functions, parallel=self.parallel and not self.forced)
        )
        return render(turns, section)

    def json_schema(self) -> dict[str, Any] | None:
        """The schema the output must match: one call, when a call is required."""
        return call_schema(self.forced) if self.forced else None

    def stops(self, stops: Sequence[str], limit: int) -> list[str]:
        """The stop strings: with one call at most, generation ends where that call closes."""
        one_call = self.choice == "auto" and not self.parallel
        if one_call and CLOSE not in stops and len(stops) < limit:
            return [*stops, CLOSE]
        return list(stops)

    def parser(self) -> ToolParser | None:
        """A parser for one choice's text (None with ``tool_choice`` none: all text is prose)."""
        if self.choice == "none":
            return None
        if self.forced:
            return ToolParser(names_of(self.forced), mode="forced")
        return ToolParser(names_of(self.functions), max_calls=None if self.parallel else 1)


def history(turns: Sequence[Turn], plan: Plan | None) -> list[ChatMessage]:
    """Chat messages for a request: through the plan when it has tools, else calls and results
    are still rendered in the ``<tool_call>`` convention (a follow-up turn may carry no tools)."""
    return plan.messages(turns) if plan is not None else render(turns, None)
