"""The small CLIP-BPE vocabulary builder is read by transformers' CLIPTokenizer exactly like a real one."""

from transformers import CLIPTokenizer

from jaxdiff.vocab import BOS, EOS, build_merges, write_clip_vocab

WORDS = "a red green blue circle square triangle above below left of right on grass sand sky photo".split()


def test_each_word_is_one_token(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_clip_vocab(tmp_path, WORDS), model_max_length=77)
    for w in WORDS:
        assert tok.tokenize(w) == [w + "</w>"]
    ids = tok("a red circle above a blue square")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids(BOS) and ids[-1] == tok.convert_tokens_to_ids(EOS)
    assert len(ids) == 9 and tok.unk_token_id not in ids[1:-1]


def test_unknown_text_falls_back_to_bytes(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_clip_vocab(tmp_path, WORDS), model_max_length=77)
    assert tok.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]


def test_later_words_do_not_change_earlier_ones():
    first = build_merges(["banana"])
    both = build_merges(["banana", "bandana", "nab"])
    assert both[: len(first)] == first
