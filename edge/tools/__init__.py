"""Function calling at the edge: tools into the prompt and a grammar, tool calls out of the text.

Workers know nothing of tools. A request with tools becomes an ordinary text job:

* **The prompt.** The model's chat template renders the turns as it always does; the tools
  reach the model as a system section written here (``system_section``), and earlier tool
  calls and tool results as text in the convention that section describes, the one Hermes-
  and Qwen-style templates use::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

  and, for a result, a user turn holding ``<tool_response>...</tool_response>``.
* **The output.** With ``tool_choice`` ``required`` or a named function the job carries a JSON
  Schema (``call_schema``) that the worker turns into a grammar: the model can only write one
  ``{"name": ..., "arguments": {...}}`` object whose arguments match the function's
  parameters. With ``auto`` the model decides, and ``ToolParser`` finds ``<tool_call>`` blocks
  (or an answer that is one bare call object, the Llama 3 style) in what it writes, holding
  back streamed text that may be the start of a block.

The API routes (``edge.routes.openai``, ``edge.routes.ollama``) turn the parser's events into
their own shapes. Modules: ``functions`` (functions, calls, turns, their checks and the call
schema), ``prompt`` (the convention), ``template`` (a model's own tools syntax), ``parser``,
and ``plan`` (what ``tool_choice`` makes of the rest).
"""

from edge.tools.functions import (
    CLOSE,
    MAX_TOOLS,
    NAME_PATTERN,
    OPEN,
    Call,
    Function,
    Turn,
    call_id,
    call_schema,
    check_functions,
    check_history,
    names_of,
)
from edge.tools.parser import (
    Arguments,
    CallDone,
    CallStarted,
    Content,
    Event,
    ToolParser,
    parse_all,
)
from edge.tools.plan import Plan, history
from edge.tools.prompt import render, system_section

__all__ = [
    "CLOSE",
    "MAX_TOOLS",
    "NAME_PATTERN",
    "OPEN",
    "Arguments",
    "Call",
    "CallDone",
    "CallStarted",
    "Content",
    "Event",
    "Function",
    "Plan",
    "ToolParser",
    "Turn",
    "call_id",
    "call_schema",
    "check_functions",
    "check_history",
    "history",
    "names_of",
    "parse_all",
    "render",
    "system_section",
]
