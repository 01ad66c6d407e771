"""The model's prompt for a request: the /think system prompt, then the conversation, in the Phi-3.5 template."""

from __future__ import annotations

from collections.abc import Sequence

from shared.think_format import Format, render_chat, system_prompt

Turn = tuple[str, str]  # (role: system | user | assistant, text)


def render_turns(turns: Sequence[Turn], fmt: Format) -> str:
    """One system turn (the format's system prompt, then the client's system texts), then the user and assistant
    turns in order, ending in the assistant's generation prompt."""
    system = "\n\n".join([system_prompt(fmt)] + [text for role, text in turns if role == "system"])
    messages = [{"role": "system", "content": system}]
    messages += [{"role": role, "content": text} for role, text in turns if role != "system"]
    return render_chat(messages, add_generation_prompt=True)


def build_prompt(user_text: str, fmt: Format) -> str:
    """The prompt of a one-question request (POST /think, or a chat of one user message)."""
    return render_turns([("user", user_text)], fmt)
