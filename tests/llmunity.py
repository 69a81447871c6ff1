"""How LLMUnity reads a streamed ``/completion``, reproduced step by step from its source.

undreamai/LLMUnity, ``Runtime/LLMCaller.cs`` ``ConvertContent`` (called on the whole body
when the request ends, and on the partial body every time the download progresses):

    response = response.Trim();
    if (response.StartsWith("data: ")) {
        string responseArray = "";
        foreach (string responsePart in response.Replace("\\n\\n", "").Split("data: ")) {
            if (responsePart == "") continue;
            if (responseArray != "") responseArray += ",\\n";
            responseArray += responsePart;
        }
        response = $"{{\\"data\\": [{responseArray}]}}";
    }
    return getContent(JsonUtility.FromJson<Res>(response));

and ``Runtime/LLMCharacter.cs`` ``MultiChatContent``, the ``getContent`` of a streamed
completion: the ``content`` of every chunk of ``data``, concatenated, then trimmed.
``JsonUtility.FromJson`` throws on text that is not JSON; LLMUnity logs the error and the
chat shows nothing, which here is the ``ValueError`` that ``json.loads`` raises.
"""

from __future__ import annotations

import json
from typing import Any


def convert_content(response: str) -> list[dict[str, Any]]:
    """The chunks LLMUnity finds in a (whole or partial) streamed body."""
    response = response.strip()
    if response.startswith("data: "):
        response_array = ""
        for part in response.replace("\n\n", "").split("data: "):
            if part == "":
                continue
            if response_array != "":
                response_array += ",\n"
            response_array += part
        response = '{"data": [' + response_array + "]}"
    parsed = json.loads(response)
    chunks: list[dict[str, Any]] = parsed["data"]
    return chunks


def multi_chat_content(response: str) -> str:
    """The text LLMUnity shows for a streamed completion body."""
    return "".join(chunk["content"] for chunk in convert_content(response)).strip()


# What LLMUnity posts to ``/embeddings`` (``LLMCaller.Embeddings``): ``JsonUtility.ToJson`` of
# a ``TokenizeRequest`` whose only field is ``content``, with ``Content-Type:
# application/json`` (and ``Authorization: Bearer <key>`` when an API key is set).
def embeddings_request(query: str) -> dict[str, Any]:
    """The body LLMUnity sends to ``{host}:{port}/embeddings``."""
    return {"content": query}


def embeddings_content(response: str) -> list[float]:
    """What LLMUnity gets from an ``/embeddings`` body: ``ConvertContent`` with
    ``JsonUtility.FromJson<EmbeddingsResult>`` (``public List<float> embedding``), then
    ``EmbeddingsContent`` returns ``result.embedding``.

    ``JsonUtility`` reads only a JSON object (a top-level array throws "JSON must represent
    an object type") and cannot fill a ``List<float>`` from nested arrays; both raise here
    as ``ValueError``, the error LLMUnity logs before it returns nothing.
    """
    response = response.strip()
    if response.startswith("data: "):  # not an embeddings body; ConvertContent would try
        raise ValueError("a streamed body is not an EmbeddingsResult")
    parsed = json.loads(response)
    if not isinstance(parsed, dict):
        raise ValueError("JSON must represent an object type")
    embedding = parsed.get("embedding", [])
    if not isinstance(embedding, list) or any(
        isinstance(x, bool) or not isinstance(x, int | float) for x in embedding
    ):
        raise ValueError("embedding is not a List<float>")
    return [float(x) for x in embedding]
