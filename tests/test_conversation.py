"""Multi-turn conversations -> ids and a loss mask: a trained ChatML tokenizer's template, the plain
template, generation endings and the errors that name the sample and the turn."""

import re

import pytest

from mimo_builder._internal.data.chat_tokenizer import train_chat_tokenizer
from mimo_builder._internal.data.conversation import conversation_ids
from mimo_builder._internal.data.tokenizer import ByteTokenizer, HFTokenizer
from mimo_builder._internal.errors import DataError

TEXTS = [f"{w} {v} number {n}. How are you? Fine, thanks." for n in range(200)
         for w, v in (("Hello", "there"), ("Be", "brief"), ("What", "is"))]
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine, thanks."}]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_chat_tokenizer(TEXTS, tmp_path_factory.mktemp("chat_tokenizer"), tags=["<image>"])


@pytest.fixture
def hf(tokenizer_dir):
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(tokenizer_dir))


def _bytes(text: str) -> list[int]:
    """ByteTokenizer()'s ids, by hand: byte + 4."""
    return [4 + b for b in text.encode()]


def _learned_runs(ids, learned) -> list[list[int]]:
    runs, run = [], []
    for token, learn in zip(ids, learned):
        if learn:
            run.append(token)
        elif run:
            runs, run = runs + [run], []
    return runs + [run] if run else runs


def test_the_trained_tokenizer_loads_back_with_its_special_tokens_and_chatml(hf, tokenizer_dir):
    tok = hf.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert list(ids.values()) == [0, 1, 2, 3] and (hf.pad_id, hf.eos_id) == (0, 1)
    # encode (add_special_tokens=False) still maps special tokens written in the text to their ids
    assert hf.encode("<|im_end|>\n")[0] == 3 and len(hf.encode("<|im_end|>\n")) == 2
    assert hf.encode("<image>") == [tok.convert_tokens_to_ids("<image>")]
    assert tok.apply_chat_template(CHAT[1:3], tokenize=False, add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there.<|im_end|>\n")
    assert tok.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_end|>\n<|im_start|>assistant\n")


def test_training_is_deterministic_and_quick(tmp_path, tokenizer_dir):
    import time
    from pathlib import Path

    start = time.perf_counter()
    again = Path(train_chat_tokenizer(TEXTS, tmp_path / "again", tags=["<image>"]))
    assert time.perf_counter() - start < 2.0
    first = Path(tokenizer_dir)
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in first.iterdir())
    for path in again.iterdir():
        assert path.read_bytes() == (first / path.name).read_bytes(), path.name


def test_a_three_turn_chat_renders_as_its_template_and_learns_the_assistant_turns(hf):
    ids, learned = conversation_ids(CHAT, hf, hf.encode, "sample 0")
    assert len(ids) == len(learned)
    assert hf.decode(ids) == hf.tokenizer.apply_chat_template(CHAT, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello there.<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n"
        "<|im_start|>assistant\nFine, thanks.<|im_end|>\n")
    runs = [hf.decode(run) for run in _learned_runs(ids, learned)]
    assert runs == ["Hello there.<|im_end|>\n", "Fine, thanks.<|im_end|>\n"]
    assert ids[-2] == 3 and learned[-1]


def test_a_user_turn_after_the_last_assistant_turn_is_kept_and_not_learned(hf):
    chat = CHAT[1:3] + [{"role": "user", "content": "Bye"}]
    ids, learned = conversation_ids(chat, hf, hf.encode, "sample 0")
    assert hf.decode(ids).endswith("Hello there.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n")
    assert [hf.decode(run) for run in _learned_runs(ids, learned)] == ["Hello there.<|im_end|>\n"]
    plain_ids, plain_learned = conversation_ids(chat, ByteTokenizer(), ByteTokenizer().encode, "sample 0")
    assert plain_ids[-len("User: Bye\n"):] == _bytes("User: Bye\n") and not any(plain_learned[-10:])


def test_generation_ends_with_the_templates_generation_prompt(hf):
    ids, learned = conversation_ids(CHAT[:4], hf, hf.encode, "sample 0", generation=True)
    assert hf.decode(ids) == hf.tokenizer.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
    assert hf.decode(ids).endswith("How are you?<|im_end|>\n<|im_start|>assistant\n")
    tail = hf.encode("<|im_start|>assistant\n")
    assert ids[-len(tail):] == tail and not any(learned[-len(tail):])


def test_the_plain_template_with_the_byte_tokenizer():
    tok = ByteTokenizer()  # eos id 3
    ids, learned = conversation_ids(CHAT, tok, tok.encode, "sample 0")
    pieces = [("System: Be brief.\nUser: Hi\nAssistant: ", False), ("Hello there.", True), ([3], True),
              ("\nUser: How are you?\nAssistant: ", False), ("Fine, thanks.", True), ([3], True), ("\n", False)]
    expected = [(_bytes(p) if isinstance(p, str) else p, learn) for p, learn in pieces]
    assert ids == [i for p, _ in expected for i in p]
    assert learned == [learn for p, learn in expected for _ in p]


def test_the_plain_template_for_generation_and_without_an_end_of_sequence_id():
    tok = ByteTokenizer(eos_id=None)
    ids, learned = conversation_ids(CHAT[1:4], tok, tok.encode, "sample 0", generation=True)
    text = "User: Hi\nAssistant: Hello there.\nUser: How are you?\nAssistant: "
    assert ids == _bytes(text)
    start = len(_bytes("User: Hi\nAssistant: "))
    assert [i for i, learn in enumerate(learned) if learn] == list(range(start, start + len("Hello there.")))


def test_a_hugging_face_tokenizer_without_a_chat_template_uses_the_plain_template(hf):
    hf.tokenizer.chat_template = None
    ids, learned = conversation_ids(CHAT[1:3], hf, hf.encode, "sample 0")
    assert hf.decode(ids) == "User: Hi\nAssistant: Hello there.<|endoftext|>\n"
    assert [hf.decode(run) for run in _learned_runs(ids, learned)] == ["Hello there.<|endoftext|>"]
    assert ids[-2] == hf.eos_id == 1


def _expanding(tokenizer):
    """The collator's kind of encode: ``<image>`` becomes three placeholder ids 1."""
    def encode(text):
        parts = re.split(r"<image>", text)
        return [i for k, part in enumerate(parts) for i in ([1, 1, 1] if k else []) + tokenizer.encode(part)]
    return encode


def test_a_tag_in_a_user_turn_goes_through_encode(hf):
    chat = [{"role": "user", "content": "What is <image>?"}, {"role": "assistant", "content": "A cat."}]
    tok = ByteTokenizer()
    ids, learned = conversation_ids(chat, tok, _expanding(tok), "sample 0")
    head = _bytes("User: What is ") + [1, 1, 1] + _bytes("?\nAssistant: ")
    assert ids == head + _bytes("A cat.") + [3] + _bytes("\n")
    assert not any(learned[:len(head)]) and all(learned[len(head):-1])
    ids, learned = conversation_ids(chat, hf, _expanding(hf), "sample 0")
    at = ids.index(1)
    assert ids[at:at + 4] == [1, 1, 1, hf.encode("?")[0]] and not any(learned[:at + 3])
    assert hf.decode(ids[:at]) == "<|im_start|>user\nWhat is "


def test_a_template_that_rewrites_earlier_turns_is_refused(hf):
    hf.tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}(earlier){% else %}{{ m.content }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError, match=r"sample 4: .*messages\[:3\].*messages\[:4\].*rewrites earlier turns"):
        conversation_ids(CHAT, hf, hf.encode, "sample 4")


def test_a_template_that_fails_is_a_data_error_naming_the_sample(hf):
    hf.tokenizer.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}"
                                  "{{ raise_exception('no system turns') }}{% endif %}{{ m.content }}{% endfor %}")
    with pytest.raises(DataError, match=r"sample 2: .*fails to render messages\[:2\].*no system turns"):
        conversation_ids(CHAT, hf, hf.encode, "sample 2")


@pytest.mark.parametrize("messages, generation, pattern", [
    ("Hi", False, r"\['messages'\] is of type str"),
    ([], False, r"\['messages'\] is an empty list"),
    ([CHAT[1], "Hello"], False, r"messages\[1\] is of type str, not a dict"),
    ([CHAT[1], {"content": "Hello"}], False, r"messages\[1\] has no 'role'; allowed roles: system, user, assistant"),
    ([CHAT[1], {"role": "bot", "content": "x"}], False, r"messages\[1\] has role 'bot'; allowed roles: system, user"),
    ([CHAT[1], {"role": "assistant"}], False, r"messages\[1\] has no 'content'"),
    ([CHAT[1], {"role": "assistant", "content": 5}], False, r"messages\[1\]\['content'\] is of type int, not text"),
    ([CHAT[1], {"role": "assistant", "content": "x", "nme": "a"}], False, r"messages\[1\] has unknown key\(s\) 'nme'"),
    (CHAT[:2], False, r"messages\[0\] to messages\[1\] hold no assistant turn"),
    (CHAT[:3], True, r"messages\[2\] is an assistant turn; to generate"),
])
def test_each_malformed_conversation_names_the_sample_and_the_turn(messages, generation, pattern):
    tok = ByteTokenizer()
    with pytest.raises(DataError, match=r"^sample 17.*" + pattern):
        conversation_ids(messages, tok, tok.encode, "sample 17", generation=generation)
