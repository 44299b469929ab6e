"""Grammar engines compared on one tokenizer: xgrammar, llguidance, outlines-core (docs/serve.md).

    python -m venv /tmp/gvenv && /tmp/gvenv/bin/pip install llguidance xgrammar outlines-core tokenizers
    # (torch: the CPU build already installed, e.g. linked into the venv, or pip install torch==2.13.0)
    llmkit import gguf --from SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smol
    /tmp/gvenv/bin/python benchmarks/grammar_engines.py /tmp/smol/tokenizer.json [llguidance xgrammar outlines-core]

Not part of llmkit's environment (only llguidance is a dependency): it runs in a scratch venv with the three
engines. For each engine, prints JSON with:

* ``features``: per JSON-schema feature, a valid and an invalid instance (compact JSON, tokenized by the
  tokenizer) fed through the engine's matcher: "ok" when the valid one is accepted and the invalid one
  rejected, "WRONG" when the engine lets the invalid one through (or refuses the valid one), "compile
  error" when it refuses the schema.
* ``unsupported``: what compiling a remote $ref, a lookahead pattern and minimum > maximum does: an error
  (and its text) or "no error" (the engine ignores the construct: outputs may violate it).
* ``compile_ms`` (best of 5: the engine's compile of a 5-property nested schema, and for llguidance the first
  matcher + first mask, since it compiles lazily) and ``mask_us_per_token`` (best of 5: the engine's own
  bitmask fill per token over a 51-token document, one thread).
"""
import json
import sys
import time

from tokenizers import Tokenizer

tok = Tokenizer.from_file(sys.argv[1])
V = tok.get_vocab_size()
# GPT-2 byte decoder
bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
cs, n = bs[:], 0
for b in range(256):
    if b not in bs:
        bs.append(b)
        cs.append(256 + n)
        n += 1
dec = {chr(c): b for b, c in zip(bs, cs)}
vocab = tok.get_vocab()
special = {a.content for a in tok.get_added_tokens_decoder().values() if a.special}
tokens = [b""] * V
special_ids = []
for piece, i in vocab.items():
    if piece in special:
        special_ids.append(i)
        tokens[i] = piece.encode()
    else:
        tokens[i] = bytes(dec[c] for c in piece)
EOS = vocab["<|im_end|>"]

# feature -> (schema, valid instance, invalid instance)
CASES = {
    "enum": ({"type": "string", "enum": ["red", "green"]}, "red", "blue"),
    "const": ({"const": "x"}, "x", "y"),
    "pattern": ({"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, "ABC-12", "AB-12"),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 4}, "abc", "abcde"),
    "integer minimum/maximum": ({"type": "integer", "minimum": 5, "maximum": 50}, 17, 51),
    "number exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0}, 0.5, -1),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
                          [1, 2], [1, 2, 3, 4]),
    "required vs optional": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                              "required": ["a"], "additionalProperties": False}, {"a": 1}, {"b": "x"}),
    "additionalProperties false": ({"type": "object", "properties": {"a": {"type": "integer"}},
                                    "additionalProperties": False}, {"a": 1}, {"a": 1, "z": 2}),
    "nested": ({"type": "object", "properties": {"p": {"type": "object", "properties": {
        "q": {"type": "array", "items": {"type": "boolean"}}}, "required": ["q"]}}, "required": ["p"]},
        {"p": {"q": [True]}}, {"p": {"q": [1]}}),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]}, "ab", [1]),
    "$ref/$defs": ({"$defs": {"n": {"type": "integer", "minimum": 0}}, "type": "object",
                    "properties": {"x": {"$ref": "#/$defs/n"}}, "required": ["x"]}, {"x": 3}, {"x": -3}),
    "format date": ({"type": "string", "format": "date"}, "2024-01-31", "yesterday"),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 10, 7),
}
UNSUPPORTED = {
    "remote $ref": {"$ref": "https://example.com/schema.json"},
    "lookahead pattern": {"type": "string", "pattern": "^(?=a)abc$"},
    "min > max (unsatisfiable)": {"type": "integer", "minimum": 10, "maximum": 5},
}
SCHEMA_TIMING = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 5},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string",
                "pattern": "^[0-9]{5}$"}}, "required": ["street", "zip"]}},
    "required": ["name", "age", "email", "address"]}
TIMING_DOC = json.dumps({"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["a", "c"],
                         "address": {"street": "12 St James's Square", "zip": "10001"}}, separators=(",", ":"))


REPEAT = 5


def enc(x):
    return tok.encode(json.dumps(x, separators=(",", ":")), add_special_tokens=False).ids


def report(name, accepts, compile_fn, mask_fn):
    res = {"engine": name, "features": {}, "unsupported": {}}
    for feat, (schema, good, bad) in CASES.items():
        try:
            g = compile_fn(schema)
        except Exception as e:
            res["features"][feat] = f"compile error: {str(e)[:80]}"
            continue
        ok_good, ok_bad = accepts(g, enc(good)), accepts(g, enc(bad))
        res["features"][feat] = "ok" if ok_good and not ok_bad else \
            f"WRONG (valid accepted={ok_good}, invalid accepted={ok_bad})"
    for feat, schema in UNSUPPORTED.items():
        try:
            g = compile_fn(schema)
            res["unsupported"][feat] = "no error (compiled)"
        except Exception as e:
            res["unsupported"][feat] = "error: " + str(e).replace("\n", " ")[:160]
    best = float("inf")
    for _ in range(REPEAT):  # best of REPEAT: the machine is shared
        t = time.perf_counter()
        g = compile_fn(SCHEMA_TIMING)
        best = min(best, time.perf_counter() - t)
    res["compile_ms"] = round(best * 1e3, 1)
    ids = tok.encode(TIMING_DOC, add_special_tokens=False).ids
    res["mask_us_per_token"] = round(min(mask_fn(g, ids) for _ in range(REPEAT)) * 1e6, 1)
    res["doc_tokens"] = len(ids)
    print(json.dumps(res, indent=1))


which = sys.argv[2:] or ["llguidance", "xgrammar", "outlines-core"]  # one JSON object per engine
if "llguidance" in which:
    import llguidance
    import llguidance.torch

    class W:
        eos_token_id, bos_token_id = EOS, None

        def __init__(self):
            self.tokens, self.special_token_ids = tokens, special_ids

        def __call__(self, s):
            return tok.encode(s.decode("utf-8", "replace") if isinstance(s, bytes) else s,
                              add_special_tokens=False).ids

    lt = llguidance.LLTokenizer(llguidance.TokenizerWrapper(W()))

    def compile_ll(schema):
        grm = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"})
        err = llguidance.LLMatcher.validate_grammar(grm, lt)
        if err:
            raise ValueError(err)
        m = llguidance.LLMatcher(lt, grm, log_level=0)  # grammar construction happens here: time it too
        m.compute_bitmask()
        return grm

    def accepts_ll(grm, ids):
        m = llguidance.LLMatcher(lt, grm, log_level=0)
        return m.consume_tokens(ids) and m.is_accepting()

    def mask_ll(grm, ids):
        m = llguidance.LLMatcher(lt, grm, log_level=0)
        bm = llguidance.torch.allocate_token_bitmask(1, V)
        t = time.perf_counter()
        for i in ids:
            llguidance.torch.fill_next_token_bitmask(m, bm, 0)
            assert m.consume_token(i), m.get_error()
        return (time.perf_counter() - t) / len(ids)

    report(f"llguidance {llguidance.__version__}", accepts_ll, compile_ll, mask_ll)

if "xgrammar" in which:
    import xgrammar as xgr
    info = xgr.TokenizerInfo(tokens, vocab_type=xgr.VocabType.RAW, vocab_size=V, stop_token_ids=[EOS])
    comp = xgr.GrammarCompiler(info, cache_enabled=False)

    def compile_xg(schema):
        return comp.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def accepts_xg(cg, ids):
        m = xgr.GrammarMatcher(cg)
        return all(m.accept_token(i) for i in ids) and m.is_terminated() is False and m.accept_token(EOS)

    def mask_xg(cg, ids):
        m = xgr.GrammarMatcher(cg)
        bm = xgr.allocate_token_bitmask(1, V)
        t = time.perf_counter()
        for i in ids:
            m.fill_next_token_bitmask(bm, 0)
            assert m.accept_token(i)
        return (time.perf_counter() - t) / len(ids)

    from importlib.metadata import version as _v
    report(f"xgrammar {_v('xgrammar')}", accepts_xg, compile_xg, mask_xg)

if "outlines-core" in which:
    from importlib.metadata import version

    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema
    vmap = {}
    for i, b in enumerate(tokens):
        if i != EOS and i not in special_ids:
            vmap.setdefault(b, []).append(i)
    voc = oc.Vocabulary(EOS, vmap)

    def compile_oc(schema):
        return oc.Index(build_regex_from_schema(json.dumps(schema), whitespace_pattern=""), voc)

    def accepts_oc(idx, ids):
        g = oc.Guide(idx)
        try:
            for i in ids:
                g.advance(i)
        except Exception:
            return False
        return g.is_finished() or EOS in g.get_tokens()

    def mask_oc(idx, ids):
        from outlines_core.kernels.torch import allocate_token_bitmask, fill_next_token_bitmask
        g = oc.Guide(idx)
        bm = allocate_token_bitmask(V)
        t = time.perf_counter()
        for i in ids:
            fill_next_token_bitmask(g, bm)
            g.advance(i)
        return (time.perf_counter() - t) / len(ids)

    report(f"outlines-core {version('outlines-core')}", accepts_oc, compile_oc, mask_oc)
