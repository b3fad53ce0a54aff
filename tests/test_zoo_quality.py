"""Zoo quality figures under harness run's default HumanEval stop rules: how completions end
(</s>, a Codex stop string, or the token limit) and their sandboxed pass@1.
The micro zoo's quality.json and card carry them: tests/test_zoo_pipeline.py."""

from __future__ import annotations

import json

import pytest

from harness.sandbox import isolation
from harness.zoo import quality as Q
from harness.zoo.build import _default_stop_lines

EOS = 1


class CharTokenizer:
    """One token per character; token 1 is </s> (dropped by skip_special_tokens, as the zoo's is)."""

    eos_token_id = EOS

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == EOS))


def enc(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_a_completion_that_ends_at_a_stop_string_counts_as_ended():
    problems = [{"task_id": f"T/{i}", "prompt": "def f(x):\n"} for i in range(4)]
    completions = [
        enc("    return x\ndef g():\n    return 2\n"),  # stop string "\ndef" before the limit
        enc("    return x\n") + [EOS, *enc("junk")],  # </s>, nothing after it kept
        enc("    x = 1\n    y = 2\n    z = 3\n"),  # runs to the 20-token limit
        enc("    return x\nde"),  # "\nde" is no stop string: on to the limit
    ]
    completions[3] += enc("e" * 10)
    rep = Q.stop_rule_report(CharTokenizer(), problems, completions, max_new_tokens=20)
    assert rep["reasons"] == ["stop:\ndef", "eos", "max_new_tokens", "max_new_tokens"]
    assert (rep["ended_before_limit"], rep["ended_with_eos"], rep["ended_with_stop_string"]) == (2, 1, 1)
    assert rep["ended_before_limit_share"] == 0.5
    assert rep["stop_strings"]["\ndef"] == 1 and sum(rep["stop_strings"].values()) == 1
    assert rep["stop"][0] == "</s>" and "\nif __name__" in rep["stop"]
    # the texts are what Record.text would hold: cut after the token that completes the stop string
    assert rep["texts"][:2] == ["    return x\ndef", "    return x\n"]
    assert rep["stopped_at_eos"] == 1


def test_cut_goes_through_the_harness_committer():
    from harness.stops import StopStrings

    stops = StopStrings(("\n#",), lambda ids: CharTokenizer().decode(ids, skip_special_tokens=True))
    tokens, why = Q.cut_at_stop(enc("    a = 1\n# done\n"), EOS, stops, max_new_tokens=64)
    assert "".join(map(chr, tokens)) == "    a = 1\n#" and why == "stop:\n#"
    assert Q.cut_at_stop(enc("abc"), EOS, stops, max_new_tokens=3) == (enc("abc"), "max_new_tokens")
    assert Q.cut_at_stop(enc("ab"), EOS, stops, max_new_tokens=3) == (enc("ab"), "open")


def test_sandboxed_pass_at_1_judges_each_completion_against_its_tests():
    problems = Q.load_humaneval()[:2]
    texts = [problems[0]["canonical_solution"] + "\ndef", "    return 0\n"]  # right (stop string left on), wrong
    iso = isolation()
    res = Q.sandboxed_pass_at_1(problems, texts, iso, name="m")
    assert (res["judged"], res["passed"], res["skipped"]) == (2, 1, 0), res["results"]
    assert res["pass@1"] == 0.5 and res["statuses"] == {"failed": 1, "passed": 1}
    assert res["isolation"] == iso.level and [r["status"] for r in res["results"]] == ["passed", "failed"]


ST = {"stop": ["</s>", "\ndef"], "problems": 4, "max_new_tokens": 20, "ended_before_limit": 3,
      "ended_before_limit_share": 0.75, "ended_with_eos": 1, "ended_with_stop_string": 2, "parse_rate": 0.5,
      "repeated_4gram_share_mean": 0.1, "mean_new_tokens": 12.0}


@pytest.mark.parametrize("level", ["full", "weak"])
def test_card_paragraph_states_the_ending_share_and_pass_at_1(level):
    ex = {"pass@1": 0.25, "judged": 4, "passed": 1, "skipped": 0, "isolation": level,
          "isolation_layers": f"{level} isolation: ..."}
    text = "\n".join(_default_stop_lines({**ST, "pass@1": ex}))
    assert "**75.0%** of completions (3 of 4) end before the 20-token limit" in text and "`\\ndef`" in text
    assert "**pass@1 0.250** (1 of 4 judged" in text and "0 skipped" in text
    assert ("WEAK isolation" in text) == (level == "weak")


def test_card_paragraph_without_execution_says_not_measured():
    text = "\n".join(_default_stop_lines(ST))
    assert "75.0%" in text and "not measured (`export.execute=false`)" in text and "pass@1 0" not in text
    assert "not measured" in "\n".join(_default_stop_lines(None))


def test_zoo_index_flags_a_component_older_than_its_base(tmp_path):
    from harness.zoo.build import write_zoo_index

    for name, info in (("target", {"parameters": 10, "training_tokens": 5, "wall_time_min": 1.0,
                                   "exported_at": "2026-11-30T22:00:00Z"}),
                       ("target-space", {"k": 2, "mask_token_id": 3, "base_model": "zoo/target", "training_tokens": 5,
                                         "wall_time_min": 1.0, "exported_at": "2026-11-26T04:00:00Z"}),
                       ("target-medusa", {"heads": {"num_heads": 2, "num_layers": 1}, "base_model": "zoo/target",
                                          "parameters": 3, "training_tokens": 5, "wall_time_min": 1.0,
                                          "exported_at": "2026-11-30T23:00:00Z"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "training.json").write_text(json.dumps(info))
    write_zoo_index(tmp_path)
    rows = {line.split("`")[1]: line for line in (tmp_path / "README.md").read_text().splitlines()
            if line.startswith("| [")}
    assert "trained on an earlier `zoo/target`" in rows["target-space"]
    assert "earlier" not in rows["target-medusa"] and "earlier" not in rows["target"]
