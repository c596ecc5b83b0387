"""Word geometry: word_id prefers the " word" token, 3CosAdd recovers analogies built into a tiny
embedding by construction and never answers with an input, the analogy file's lines are counted
by reason, accuracy is hand-checkable, and the residual-stream space at layer 0 is the embedding."""

import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.interp import embeddings as E
from lmforge.interp.hooks import HookedModel
from lmforge.model import ModelConfig, Transformer


class WordTokenizer:
    """A tiny tokenizer: whole tokens from a list where the text is one of them, else one id per character."""

    def __init__(self, tokens, bos_id=None):
        chars = sorted(set(" abcdefghijklmnopqrstuvwxyz"))
        self.tokens = list(tokens) + [ch for ch in chars if ch not in tokens]
        self.bos_id = bos_id

    @property
    def vocab_size(self):
        return len(self.tokens)

    def encode(self, text):
        if text in self.tokens:
            return [self.tokens.index(text)]
        return [self.tokens.index(ch) for ch in text]

    def id_to_bytes(self, i):
        return self.tokens[i].encode()


# king = R + M, queen = R + F, man = P + M, woman = P + F, ... over orthonormal directions, so that
# queen - king + man = woman exactly (all rows have the same norm, so unit-normalising keeps it).
R, P, C, M, F, X = torch.eye(8)[:6]
VECTORS = {" king": R + M, " queen": R + F, " man": P + M, " woman": P + F, " boy": C + M, " girl": C + F,
           " x": X, "king": -R}
TOKENS = list(VECTORS)


def _space():
    tok = WordTokenizer(TOKENS)
    weight = torch.zeros(tok.vocab_size, 8)
    for i, t in enumerate(TOKENS):
        weight[i] = VECTORS[t]
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=8, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, intermediate_size=16,
                                    max_position_embeddings=8))
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(weight)
    return tok, E.embedding_space(model, tok)


def test_word_id_prefers_the_leading_space_form_and_refuses_multi_token_words():
    tok = WordTokenizer(TOKENS)
    assert E.word_id(tok, "king") == TOKENS.index(" king")  # " king" and "king" both exist: the spaced one
    assert E.word_id(tok, "x") == TOKENS.index(" x")
    with pytest.raises(LmforgeError, match="'kingdom' is not a single token"):
        E.word_id(tok, "kingdom")
    # the letters-only vocabulary words: "king" once (as " king"), no single characters beyond "x"'s " x"
    words = E.vocab_words(tok)
    assert words["king"] == TOKENS.index(" king")
    assert set(words) >= {"king", "queen", "man", "woman", "boy", "girl", "x"}
    assert all(len(tok.encode(" " + w)) == 1 or len(tok.encode(w)) == 1 for w in words)


def test_3cosadd_recovers_built_in_analogies_and_nearest_ranks_by_cosine():
    _, space = _space()
    assert E.analogy(space, "king", "queen", "man")[0][0] == "woman"
    assert E.analogy(space, "man", "woman", "boy")[0] == ("girl", pytest.approx(1.0))
    assert E.analogy_rank(space, "king", "queen", "man", "woman") == 1
    assert E.analogy_rank(space, "king", "queen", "man", "x") > 1
    top = E.nearest(space, "king", k=3)
    assert top[0][1] == pytest.approx(0.5) and {w for w, _ in top[:2]} == {"queen", "man"}
    assert "king" not in [w for w, _ in E.nearest(space, "king", k=20)]


def test_the_three_inputs_are_excluded_even_when_they_score_highest():
    _, space = _space()
    # woman - man + queen = R + 2F - M: closest (unexcluded) is queen itself, an input
    v = space.vectors
    target = torch.nn.functional.normalize(v[space.row["woman"]] - v[space.row["man"]] + v[space.row["queen"]], dim=0)
    assert space.words[int((v @ target).argmax())] == "queen"
    answers = [w for w, _ in E.analogy(space, "man", "woman", "queen", k=5)]
    assert not {"man", "woman", "queen"} & set(answers)
    assert answers[0] == "girl"  # C + F: cos (R + 2F - M) . (C + F) is the best left
    with pytest.raises(LmforgeError, match="'prince' is not among"):
        E.analogy(space, "king", "queen", "prince")


def test_analogy_file_counts_skipped_lines_and_accuracy_is_top1_by_section(tmp_path):
    tok, space = _space()
    f = tmp_path / "q.txt"
    f.write_text("king queen man woman\n"                # before any section: malformed
                 ": family\nking queen man woman\nman woman boy girl\n"
                 "man woman king girl\n"                   # wrong answer: king - ... gives queen
                 "king queen man\n"                        # three words: malformed
                 "\n: other\nking queen prince princess\n"  # prince is not a single token
                 "boy girl king queen\n")
    qs = E.read_analogies(f, tok)
    assert qs.skipped == {"malformed": 2, "not single-token": 1}
    assert {s: len(q) for s, q in qs.sections.items()} == {"family": 3, "other": 1}
    result = E.analogy_accuracy(space, qs)
    assert result.correct == {"family": 2, "other": 1} and result.total == {"family": 3, "other": 1}
    assert result.accuracy == pytest.approx(3 / 4)
    assert E.file_words(qs, tok) == {w: E.word_id(tok, w) for w in ("boy", "girl", "king", "man", "queen", "woman")}


def test_bad_analogy_files_are_one_line_errors(tmp_path):
    tok = WordTokenizer(TOKENS)
    with pytest.raises(LmforgeError, match="not found"):
        E.read_analogies(tmp_path / "missing.txt", tok)
    big = tmp_path / "big.txt"
    big.write_text(": s\n" + "king queen man woman\n" * 100)
    with pytest.raises(LmforgeError, match="over the 100-byte limit"):
        E.read_analogies(big, tok, max_bytes=100)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b": s\n\xff\xfe king")
    with pytest.raises(LmforgeError, match="not UTF-8") as e:
        E.read_analogies(binary, tok)
    assert "\n" not in str(e.value)
    empty = tmp_path / "empty.txt"
    empty.write_text(": s\nkingdom queen man woman\n")
    with pytest.raises(LmforgeError, match="no analogy question"):
        E.analogy_accuracy(_space()[1], E.read_analogies(empty, tok))


def test_residual_space_is_the_embedding_at_layer_0_and_the_cached_stream_deeper():
    tok = WordTokenizer(TOKENS, bos_id=TOKENS.index(" x"))
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, max_position_embeddings=8)
    model = Transformer(config)
    model.init_weights(seed=0)
    hooked = HookedModel(model.eval())
    words = {w: E.word_id(tok, w) for w in ("king", "queen", "man", "woman")}
    torch.testing.assert_close(E.residual_space(hooked, tok, words, 0).vectors,
                               E.embedding_space(model, tok, words).vectors)
    deep = E.residual_space(hooked, tok, words, 2, batch_size=3)  # two batches
    with torch.no_grad():
        _, cache = hooked.run_with_cache(torch.tensor([[tok.bos_id, words["man"]]]),
                                         names_filter="blocks.1.hook_resid_post")
    torch.testing.assert_close(deep.vectors[deep.row["man"]],
                               torch.nn.functional.normalize(cache["blocks.1.hook_resid_post"][0, -1], dim=0))
    with pytest.raises(LmforgeError, match="--layer 3 is out of range"):
        E.residual_space(hooked, tok, words, 3)


def test_cli_prints_neighbours_and_accuracy_and_fails_in_one_line(tmp_path, capsys):
    from lmforge.checkpoint import save_model_folder
    from lmforge.cli import main
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.train(["the king and the queen met the man and the woman and the boy and the girl. "] * 50,
                          vocab_size=300)
    assert len(tok.encode(" king")) == 1
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                                    max_position_embeddings=16))
    model.init_weights(seed=0)
    folder = save_model_folder(tmp_path / "m", model, tok)
    assert main(["inspect", "neighbours", "king", "--model", str(folder), "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.split()[1] != "king" for line in lines)
    questions = tmp_path / "q.txt"
    questions.write_text(": s\nking queen man woman\nman woman boy girl\nking queen boy\n")
    assert main(["inspect", "analogies", str(questions), "--model", str(folder), "--layer", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 malformed" in out and "/2 " in out.splitlines()[-1]
    for argv, match in ((["analogies", str(tmp_path / "nope.txt")], "not found"),
                        (["analogy", "king", "queen", "man", "--layer", "1"], "--layer needs --vocab"),
                        (["neighbours", "xylophonist"], "not a single token")):
        assert main(["inspect", *argv, "--model", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err and match in err, err
