"""Multi-turn conversations -> token ids, and per id whether the loss learns it.

A conversation is a list of turns ``{"role": "system" | "user" | "assistant", "content": str}``
(no other keys). The loss learns what the assistant says: each assistant turn's content and the
end of that turn. Nothing else is learned: system and user turns, the text that opens an
assistant turn, and user or system turns after the last assistant turn (allowed, unlearned).
Training needs at least one assistant turn; generation needs the conversation to end with a user
or system turn, and the ids end with the prompt that opens the assistant's turn (unlearned;
earlier assistant turns keep their marks).

With a Hugging Face tokenizer that has a chat template, the template renders the conversation:
assistant turn ``i`` learns the text between ``render(messages[:i], add_generation_prompt=True)``
and ``render(messages[:i+1])`` (its content and end-of-turn tokens, e.g. ``<|im_end|>\\n``). Each
render must start with the one before it; a template that rewrites earlier turns is refused.

Otherwise (the byte tokenizer, or a Hugging Face tokenizer without a chat template) the plain
template renders each turn as ``"{Role}: {content}\\n"`` with Role ``System``, ``User`` or
``Assistant``, except that an assistant turn is::

    "Assistant: "       not learned
    content             learned
    end of sequence     learned (the id tokenizer.eos_id; left out where it is None)
    "\\n"                not learned

and generation ends with ``"Assistant: "``. E.g. ``[system "Be brief.", user "Hi", assistant
"Hello"]`` renders ``"System: Be brief.\\nUser: Hi\\nAssistant: "`` + ``"Hello"`` + eos (learned) +
``"\\n"``.

Text goes through the collator's ``encode`` one piece at a time (each run of unlearned text, each
learned span), so modality tags like ``<image>`` expand wherever they stand.
"""

from __future__ import annotations

from mimo_builder._internal.errors import DataError

ROLES = ("system", "user", "assistant")
"""Roles a turn may have."""

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
"""How the plain template names each role."""


def conversation_ids(messages, tokenizer, encode, name: str, *,
                     generation: bool = False) -> tuple[list[int], list[bool]]:
    """ids of the whole rendered conversation and, per id, whether the loss learns it.

    ``encode(text) -> list[int]`` encodes one piece of text (expanding modality tags); ``name``
    names the sample in errors. See the module docstring for the templates."""
    check_messages(messages, name, generation=generation)
    hf = getattr(tokenizer, "tokenizer", None)
    if getattr(hf, "chat_template", None):
        pieces = _template_pieces(messages, hf, name, generation)
    else:
        pieces = _plain_pieces(messages, tokenizer.eos_id, generation)
    ids, learned = [], []
    for piece, learn in pieces:
        piece_ids = list(piece) if isinstance(piece, list) else list(encode(piece))
        ids += piece_ids
        learned += [learn] * len(piece_ids)
    return ids, learned


def check_messages(messages, name: str, *, generation: bool = False) -> None:
    """Raise a DataError naming ``name`` and the turn if ``messages`` is not a conversation to
    train on (or, with ``generation``, to continue)."""
    if not isinstance(messages, list) or not messages:
        what = "an empty list" if isinstance(messages, list) else f"of type {type(messages).__name__}"
        raise DataError(f"{name}['messages'] is {what}; give a list of turns "
                        f"{{'role': {' | '.join(map(repr, ROLES))}, 'content': str}}")
    for i, turn in enumerate(messages):
        _check_turn(turn, f"{name}: messages[{i}]")
    last = len(messages) - 1
    if generation and messages[last]["role"] == "assistant":
        raise DataError(f"{name}: messages[{last}] is an assistant turn; to generate, a conversation ends "
                        f"with a user or system turn")
    if not generation and all(turn["role"] != "assistant" for turn in messages):
        raise DataError(f"{name}: messages[0] to messages[{last}] hold no assistant turn; training learns the "
                        f"assistant's turns, so a conversation needs at least one")


def _check_turn(turn, where: str) -> None:
    if not isinstance(turn, dict):
        raise DataError(f"{where} is of type {type(turn).__name__}, not a dict with 'role' and 'content'")
    allowed = f"allowed roles: {', '.join(ROLES)}"
    if "role" not in turn:
        raise DataError(f"{where} has no 'role'; {allowed}")
    if turn["role"] not in ROLES:
        raise DataError(f"{where} has role {turn['role']!r}; {allowed}")
    if "content" not in turn:
        raise DataError(f"{where} has no 'content' (the turn's text)")
    if not isinstance(turn["content"], str):
        raise DataError(f"{where}['content'] is of type {type(turn['content']).__name__}, not text (str)")
    unknown = sorted(map(str, set(turn) - {"role", "content"}))
    if unknown:
        raise DataError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; a turn has only "
                        f"'role' and 'content'")


def _add(pieces: list, piece, learned: bool) -> None:
    """Append ``piece`` (text, or a list of ids), joining it to a previous text of the same mark."""
    if isinstance(piece, str) and pieces and isinstance(pieces[-1][0], str) and pieces[-1][1] == learned:
        pieces[-1] = (pieces[-1][0] + piece, learned)
    elif piece:
        pieces.append((piece, learned))


def _plain_pieces(messages: list[dict], eos_id: int | None, generation: bool) -> list:
    pieces = []
    for turn in messages:
        if turn["role"] == "assistant":
            _add(pieces, "Assistant: ", False)
            _add(pieces, turn["content"], True)
            _add(pieces, [eos_id] if eos_id is not None else [], True)
            _add(pieces, "\n", False)
        else:
            _add(pieces, f"{PLAIN_ROLES[turn['role']]}: {turn['content']}\n", False)
    if generation:
        _add(pieces, "Assistant: ", False)
    return pieces


def _template_pieces(messages: list[dict], hf, name: str, generation: bool) -> list:
    pieces, done, done_label = [], "", "nothing"
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prefix_label, full_label = f"messages[:{i}] with the generation prompt", f"messages[:{i + 1}]"
        prefix = _render(hf, messages[:i], True, name, prefix_label)
        full = _render(hf, messages[:i + 1], False, name, full_label)
        _add(pieces, _rest(done, prefix, name, done_label, prefix_label), False)
        _add(pieces, _rest(prefix, full, name, prefix_label, full_label), True)
        done, done_label = full, full_label
    end_label = f"messages[:{len(messages)}]" + (" with the generation prompt" if generation else "")
    end = _render(hf, messages, generation, name, end_label)
    _add(pieces, _rest(done, end, name, done_label, end_label), False)
    return pieces


def _render(hf, turns: list[dict], generation_prompt: bool, name: str, label: str) -> str:
    try:
        return hf.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # a template's own raise_exception, or any jinja error, names no sample
        raise DataError(f"{name}: the tokenizer's chat template fails to render {label}: "
                        f"{type(err).__name__}: {err}") from err


def _rest(shorter: str, longer: str, name: str, shorter_label: str, longer_label: str) -> str:
    """``longer`` past ``shorter``, which must start it."""
    if longer.startswith(shorter):
        return longer[len(shorter):]
    at = next((k for k, (a, b) in enumerate(zip(shorter, longer)) if a != b), min(len(shorter), len(longer)))
    raise DataError(f"{name}: the tokenizer's chat template renders {shorter_label} as text that does not "
                    f"start its render of {longer_label} (they part at character {at}: "
                    f"{shorter[at:at + 30]!r} vs {longer[at:at + 30]!r}); the loss mask needs a template that "
                    f"renders a conversation's turns by appending, not one that rewrites earlier turns")
