"""A source's Jinja chat template as recurchat's ChatFormat (data/tokenizer.py).

    fmt = chat_format(template, special_tokens, bos="<|endoftext|>", pad="<|im_end|>", bos_token="<|im_start|>")

The template is rendered (sandboxed, as transformers renders it) on conversations whose contents are sentinels, and
the text around the sentinels gives each role's start and end marker, whether a conversation opens with BOS, and the
system message the template adds when there is none. A start marker begins at the last special token before the
role's name (ChatML: "<|im_end|>\\n" | "<|im_start|>user\\n"; Llama 3: "<|eot_id|>" |
"<|start_header_id|>user<|end_header_id|>\\n\\n"). A template that does not render every message as start + content
+ end (e.g. one that folds the system prompt into the first user turn) is a one-line error: recurchat's chat
rendering could not reproduce it. Exercise: `pytest tests/interop/test_chat_template.py`.
"""

from __future__ import annotations

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from recurchat.data.tokenizer import ChatFormat
from recurchat.errors import UserError

SENTINEL = "\x00{}\x00"  # contents no template produces on its own


def render(template: str, messages: list[dict], generation_prompt: bool, tokens: dict[str, str]) -> str:
    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=generation_prompt,
                                                **tokens)
    except TemplateError as e:
        raise UserError(f"the chat template does not render ({e})") from None


def split_marker(between: str, role: str, specials: list[str]) -> tuple[str, str]:
    """(end of the previous message, start of `role`'s) from the text between two contents."""
    name = between.rfind(role)
    if name < 0:
        raise UserError(f"the chat template writes no {role!r} before a {role} message; recurchat cannot map it")
    cut = max((between.rfind(t, 0, name) for t in specials), default=-1)
    if cut < 0:
        raise UserError(f"the chat template has no special token before the role name {role!r}")
    return between[:cut], between[cut:]


def pieces(text: str, names: list[str]) -> list[str]:
    """The text before, between and after the sentinels `names` (in order)."""
    out, at = [], 0
    for n in names:
        i = text.find(SENTINEL.format(n), at)
        if i < 0:
            raise UserError("the chat template drops or reorders message contents; recurchat cannot map it")
        out.append(text[at:i])
        at = i + len(SENTINEL.format(n))
    return out + [text[at:]]


def chat_format(template: str, specials: list[str], bos: str, pad: str, bos_token: str = "",
                eos_token: str = "") -> ChatFormat:
    """ChatFormat of `template`; `specials` are the source's special token texts, `bos`/`pad` recurchat's picks, and
    `bos_token`/`eos_token` the names the template reads."""
    tokens = {"bos_token": bos_token, "eos_token": eos_token}
    msg = [{"role": r, "content": SENTINEL.format(n)} for r, n in
           (("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2"), ("assistant", "A2"))]
    head, s_u, u_a, a_u, u_a2, tail = pieces(render(template, msg, False, tokens), ["S", "U1", "A1", "U2", "A2"])
    prompt = pieces(render(template, msg[:2], True, tokens), ["S", "U1"])[-1]
    system_end, user_start = split_marker(s_u, "user", specials)
    user_end, assistant_start = split_marker(u_a, "assistant", specials)
    assistant_end, again = split_marker(a_u, "user", specials)
    bos_text, system_start = split_marker(head, "system", specials)
    if again != user_start or u_a2 != u_a or tail != assistant_end or prompt != user_end + assistant_start:
        raise UserError("the chat template renders a role differently by position; recurchat cannot map it")
    if bos_text not in ("", bos_token) or (bos_text and bos_text != bos):
        raise UserError(f"the chat template opens with {bos_text!r}, which is not the BOS token {bos!r}")
    markers = {"system_start": system_start, "system_end": system_end, "user_start": user_start,
               "user_end": user_end, "assistant_start": assistant_start, "assistant_end": assistant_end}
    return ChatFormat(bos=bos, pad=pad, markers=markers, chat_bos=bool(bos_text),
                      default_system=default_system(template, tokens, bos_text, system_start, system_end))


def default_system(template: str, tokens: dict[str, str], bos_text: str, start: str, end: str) -> str:
    """The system message the template adds to a conversation without one ("" if it adds none)."""
    head = pieces(render(template, [{"role": "user", "content": SENTINEL.format("U")}], True, tokens), ["U"])[0]
    added = head[len(bos_text):]
    if not added.startswith(start) or end not in added[len(start):]:
        return ""
    return added[len(start):added.index(end, len(start))]
