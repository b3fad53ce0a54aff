"""Function-level training samples: extraction per language on small
synthetic sources, EOS after every sample, and the file/function mix of training batches."""

from __future__ import annotations

import numpy as np
import pytest

from harness.train.lm import MixedBatches
from harness.zoo.corpus import Document
from harness.zoo.functions import (
    FunctionSamplesConfig,
    blank_code,
    classify_signature,
    encode_function_samples,
    extract_functions,
)

PY = '''"""Module docstring."""
import os
import re as regex
from typing import List, Dict

X = 1


# helper comment
def join(parts: List[str]) -> str:
    """Join parts."""
    return os.sep.join(parts)


class Box:
    def size(self):
        """The size."""
        total = 0
        return total

    @property
    def short(self): return 1


def _tiny(): pass
'''

CPP = '''#include <vector>
#ifdef __cplusplus
extern "C" {
#endif
/* Add two ints. */
static inline int add(int a, int b) {
  const char *s = "}{";  // a brace in a string: "}"
  return a + b;
}
#ifdef __cplusplus
}
#endif
namespace ns {
class Foo : public Bar {
 public:
  // Constructs.
  Foo(int x) : x_(x) {
    if (x > 0) {
      x_ = x;
    }
  }
  int get() const { return x_; }
};
}  // namespace ns
'''

JAVA = '''package p;

import java.util.*;

class Solution {
    /**
     * Sum of a list.
     */
    public int sum(List<Integer> xs) {
        int s = 0;
        for (int x : xs) { s += x; }
        return s;
    }

    private Runnable r = new Runnable() {
        public void run() {
            System.out.println("}");
        }
    };

    @SuppressWarnings("unchecked")
    static <T> T first(List<T> xs) throws IllegalStateException {
        char c = '{';
        return xs.get(0);
    }
}
'''

JS = '''// Adds.
function add(a, b) {
  const re = /[{]/g;
  return `${a}` + b;
}

const hasCloseElements = (numbers, threshold) => {
  return numbers.length > threshold;
};

app.get('/', function (req, res) {
  res.send('x');
});

module.exports = {
  double: function (x) {
    return x * 2;
  },
};
'''

GO = '''package main

import "fmt"

// Hello prints a greeting
// to the console.
func Hello(name string) (n int, err error) {
	s := `raw {`
	fmt.Println(s, name)
	return 0, nil
}

func (b *Buf) Any() interface{} {
	if b == nil {
		return nil
	}
	return b.x
}
'''


def test_python_functions_and_methods_with_imports_and_headers():
    got = extract_functions(PY, "python")
    assert len(got) == 2  # join, Box.size (short and _tiny are below min_lines)
    join, size = got
    assert join.startswith("import os\nfrom typing import List, Dict\n\n\n# helper comment\ndef join(")
    assert "import re" not in join  # only the imports the function uses
    assert size.startswith("\n\ndef size(self):\n    \"\"\"The size.\"\"\"")  # dedented method, HumanEval-like start
    assert all(s.endswith("\n") and not s.endswith("\n\n") for s in got)
    no_imports = extract_functions(PY, "python", FunctionSamplesConfig(python_imports=False))
    assert no_imports[0].startswith("\n\n# helper comment\ndef join(")


def test_cpp_functions_inside_extern_namespace_and_class():
    got = extract_functions(CPP, "cpp")
    assert got[0] == ('/* Add two ints. */\nstatic inline int add(int a, int b) {\n'
                      '  const char *s = "}{";  // a brace in a string: "}"\n  return a + b;\n}\n')
    assert got[1].startswith("// Constructs.\nFoo(int x) : x_(x) {\n  if (x > 0) {")  # method, dedented
    assert got[1].endswith("  }\n}\n")
    assert len(got) == 2  # the one-line get() is below min_lines; if-blocks are not functions


def test_java_methods_with_javadoc_annotations_and_anonymous_classes():
    got = extract_functions(JAVA, "java")
    # the field holding an anonymous class is not a method, the method inside it is
    assert [g.split("\n")[0] for g in got] == ["/**", "public void run() {", "@SuppressWarnings(\"unchecked\")"]
    assert got[0].split("\n")[3].startswith("public int sum(")
    assert got[1] == 'public void run() {\n    System.out.println("}");\n}\n'
    assert got[2].rstrip().endswith("return xs.get(0);\n}")


def test_js_declarations_arrows_and_object_methods_not_callbacks():
    got = extract_functions(JS, "js")
    assert got[0].startswith("// Adds.\nfunction add(a, b) {") and got[0].endswith("}\n")
    assert got[1].startswith("const hasCloseElements = ") and got[1].endswith("};\n")
    assert got[2] == "double: function (x) {\n  return x * 2;\n}\n"  # the trailing comma is dropped
    assert len(got) == 3  # the callback passed to app.get is not a sample


def test_go_functions_with_comment_header_and_interface_return():
    got = extract_functions(GO, "go")
    assert len(got) == 2
    assert got[0].startswith("// Hello prints a greeting\n// to the console.\nfunc Hello(")
    assert got[1].startswith("func (b *Buf) Any() interface{} {") and got[1].endswith("\treturn b.x\n}\n")


def test_blanking_keeps_length_and_hides_literal_braces():
    for lang, src in (("cpp", CPP), ("java", JAVA), ("js", JS), ("go", GO)):
        b = blank_code(src, lang)
        assert len(b) == len(src) and b.count("\n") == src.count("\n")
        assert b.count("{") == b.count("}")
    assert classify_signature("if (x > 0)", "cpp") == "control"
    assert classify_signature("int f(int a) const noexcept", "cpp") == "function"
    assert classify_signature("class Foo : public Bar", "cpp") == "other"
    assert classify_signature("x = new Foo()", "java") == "other"


def test_size_bounds_and_unknown_language():
    assert extract_functions(PY, "python", FunctionSamplesConfig(max_chars=40)) == []
    assert len(extract_functions(GO, "go", FunctionSamplesConfig(min_lines=7))) == 1
    with pytest.raises(ValueError, match="no function extractor"):
        extract_functions("x", "rust")


class _Tok:
    """The few tokenizer attributes the encoder uses: one id per character."""

    bos_token_id, eos_token_id = 1, 2

    def __len__(self):
        return 300

    class backend_tokenizer:  # noqa: N801
        @staticmethod
        def encode_batch(texts, add_special_tokens=False):
            return [type("E", (), {"ids": [3 + ord(c) % 290 for c in t]}) for t in texts]


def test_encoded_stream_ends_every_sample_with_eos_and_skips_heldout(tmp_path):
    docs = [Document("python", "a.py", PY, "a"), Document("go", "b.go", GO, "b"),
            Document("js", "c.js", JS, "c", split="heldout")]
    meta = encode_function_samples(docs, _Tok(), tmp_path, FunctionSamplesConfig())
    stream = np.load(tmp_path / "train_functions.npy")
    assert meta["samples"] == 4 and meta["tokens"] == len(stream)
    assert set(meta["per_language"]) == {"python", "go"}  # held-out files give no samples
    starts = np.flatnonzero(stream == 1)
    ends = np.flatnonzero(stream == 2)
    assert len(starts) == len(ends) == 4
    assert list(starts[1:]) == list(ends[:-1] + 1) and ends[-1] == len(stream) - 1  # <s> ... </s><s> ... </s>


def test_mixed_batches_take_the_configured_share_and_resume():
    files = np.arange(10_000, dtype=np.uint16) % 100 + 1000  # values >= 1000
    funcs = np.arange(10_000, dtype=np.uint16) % 100  # values < 100
    mb = MixedBatches(files, funcs, batch_size=8, seq_len=16, share=0.25, seed=3)
    b = next(mb)
    assert b.shape == (8, 17)
    assert bool((b[:6] >= 1000).all()) and bool((b[6:] < 100).all())  # 2 of 8 rows are function-level
    state = mb.state_dict()
    nxt = next(mb)
    again = MixedBatches(files, funcs, batch_size=8, seq_len=16, share=0.25, seed=3)
    again.load_state_dict(state)
    assert bool((next(again) == nxt).all())
    with pytest.raises(ValueError, match="function_share"):
        MixedBatches(files, funcs, batch_size=8, seq_len=16, share=0.01)
