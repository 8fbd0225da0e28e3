"""Tool calls (OpenAI's `tools` and `tool_choice`) for models whose chat template renders tools and asks for
calls in the Hermes format, as Qwen2.5/Qwen3 and Hermes models do:

  <tool_call>
  {"name": "get_weather", "arguments": {"city": "Paris"}}
  </tool_call>

The tools go to the template (Hugging Face's `tools` variable); the model's output is searched for those
blocks, which become the message's `tool_calls`. `tool_choice` "required" or a named function constrains the
output (grammar.py) to such a block whose arguments follow the function's JSON schema, so even a small model
returns a call that parses. A model whose template does not render tools, or asks for another format, gets its
`tools` refused by name: answering as if there were no tools would be a silent wrong answer.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid

from psa_jax.serving import grammar

BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_TOOLS = 128


class ToolError(ValueError):
  """A request's tools or tool choice that cannot be honoured; `param` names the field."""

  def __init__(self, message: str, param: str):
    super().__init__(message)
    self.param = param


def supported(chat_template: str | None) -> bool:
  """Whether the template renders tools and asks for Hermes-format calls."""
  return bool(chat_template) and "tools" in chat_template and "<tool_call>" in chat_template


@dataclasses.dataclass(frozen=True)
class ToolRequest:
  tools: tuple[dict, ...]  # OpenAI tool objects: {"type": "function", "function": {"name", "parameters", ...}}
  choice: str | None  # "auto", "none", "required", or a function's name (forced)

  @property
  def names(self) -> list[str]:
    return [t["function"]["name"] for t in self.tools]

  @property
  def active(self) -> bool:
    """The model may call a tool: the tools are rendered and its output searched for calls."""
    return self.choice != "none"

  def template_tools(self) -> list[dict] | None:
    return list(self.tools) if self.active else None

  def constraint(self) -> tuple[str, str, str] | None:
    """("tool_choice", "regex", pattern) where the choice forces a call: one Hermes block calling a forced
    function with arguments valid for its schema."""
    if self.choice in ("auto", "none"):
      return None
    forced = self.names if self.choice == "required" else [self.choice]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": name},
                             "arguments": self._parameters(name)}} for name in forced]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    try:
      body = grammar.regex_for("json_schema", schema)
    except grammar.GrammarError as e:
      raise ToolError(f"cannot constrain the call: {e}", "tools") from e
    return "tool_choice", "regex", re.escape("<tool_call>\n") + body + re.escape("\n</tool_call>")

  def _parameters(self, name: str) -> dict:
    function = next(t["function"] for t in self.tools if t["function"]["name"] == name)
    return function.get("parameters") or {"type": "object", "properties": {}}

  def parse(self, text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished output: the Hermes blocks that call a known function with object
    arguments become OpenAI tool calls (arguments as a JSON string); the rest of the text is the content."""
    calls = []
    for match in BLOCK.finditer(text):
      try:
        call = json.loads(match.group(1))
      except json.JSONDecodeError:
        continue
      if (isinstance(call, dict) and call.get("name") in self.names
          and isinstance(call.get("arguments", {}), dict)):
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}})
    if not calls:
      return text, []
    content = BLOCK.sub("", text).strip()
    return content or None, calls


def parse_request(body: dict, chat_template: str | None) -> ToolRequest | None:
  """The tools and tool choice of a chat body, checked; None when it has no tools."""
  tools, choice = body.get("tools"), body.get("tool_choice")
  if not tools:
    if choice not in (None, "none", "auto"):
      raise ToolError("'tool_choice' needs 'tools'", "tool_choice")
    return None
  if not supported(chat_template):
    raise ToolError("this model's chat template does not render tools in a format the server can parse "
                    "(Hermes <tool_call> blocks)", "tools")
  if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
    raise ToolError(f"'tools' must be a list of at most {MAX_TOOLS} tools", "tools")
  for i, tool in enumerate(tools):
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or tool.get("type") != "function":
      raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
    if not isinstance(function.get("name"), str) or not NAME.fullmatch(function["name"]):
      raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'", "tools")
    if not isinstance(function.get("parameters", {}), dict):
      raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
  names = [t["function"]["name"] for t in tools]
  if len(set(names)) != len(names):
    raise ToolError("tool names must be unique", "tools")
  if choice is None:
    choice = "auto"
  elif isinstance(choice, dict):
    function = choice.get("function")
    if choice.get("type") != "function" or not isinstance(function, dict) or function.get("name") not in names:
      raise ToolError(f"'tool_choice' must name one of the tools {names}", "tool_choice")
    choice = function["name"]
  elif choice not in ("auto", "none", "required"):
    raise ToolError("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                    "{'name': ...}}", "tool_choice")
  if not isinstance(body.get("parallel_tool_calls", True), bool):
    raise ToolError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
  return ToolRequest(tuple(tools), choice)


def template_message(message: dict, index: int) -> dict:
  """A checked assistant message's `tool_calls` (or a tool message), as chat templates expect them: arguments as
  an object, not OpenAI's JSON string."""
  if message["role"] == "tool":
    return {"role": "tool", "content": message["content"], "tool_call_id": message.get("tool_call_id")}
  calls = []
  for call in message["tool_calls"]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
      raise ToolError(f"messages[{index}].tool_calls must be OpenAI tool calls", "messages")
    arguments = function.get("arguments", "{}")
    try:
      arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError as e:
      raise ToolError(f"messages[{index}]: a tool call's arguments are not valid JSON: {e}", "messages") from e
    calls.append({"id": call.get("id"), "type": "function",
                  "function": {"name": function["name"], "arguments": arguments}})
  return {"role": "assistant", "content": message["content"], "tool_calls": calls}
