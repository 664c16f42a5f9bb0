"""Attention-hook mistakes that used to pass `check` are positioned errors (the style of
test_errors.py): a misspelt hook is not silently dropped, and hooks cannot index q, k, v."""
from __future__ import annotations

import layerforge
from tests.dsl.test_errors import ATTN_DIMS, expect, load_error, src


def test_misspelt_score_hook_is_an_error_with_a_hint():
    err = load_error(ATTN_DIMS + src("""\
        attention a(q: bf16[B, S, Hq, D], k: bf16[B, Skv, Hkv, D], v: bf16[B, Skv, Hkv, D]) -> bf16[B, S, Hq, D] {
            scroe = 50.0 * tanh(score / 50.0)
            mask = q_pos >= kv_pos
        }
        """))
    expect(err, 4, 5, "'scroe' is assigned but never used", hint="did you mean 'score'?")


def test_misspelt_mask_hook_is_an_error_with_a_hint():
    err = load_error(ATTN_DIMS + src("""\
        attention a(q: bf16[B, S, Hq, D], k: bf16[B, Skv, Hkv, D], v: bf16[B, Skv, Hkv, D]) -> bf16[B, S, Hq, D] {
            msk = q_pos >= kv_pos
        }
        """))
    expect(err, 4, 5, "'msk' is assigned but never used", hint="did you mean 'mask'?")


def test_unused_local_is_an_error_and_used_locals_are_fine():
    err = load_error(ATTN_DIMS + src("""\
        attention a(q: bf16[B, S, Hq, D], k: bf16[B, Skv, Hkv, D], v: bf16[B, Skv, Hkv, D]) -> bf16[B, S, Hq, D] {
            rel = kv_pos - q_pos
            unrelated = 2 * rel
            score = score + f32(rel)
        }
        """))
    expect(err, 5, 5, "'unrelated' is assigned but never used", hint="use it in score, mask, scale or sink")
    ok = ATTN_DIMS + src("""\
        attention a(q: bf16[B, S, Hq, D], k: bf16[B, Skv, Hkv, D], v: bf16[B, Skv, Hkv, D]) -> bf16[B, S, Hq, D] {
            rel = kv_pos - q_pos
            score = score + f32(rel)
        }
        """)
    layerforge.loads(ok, "m.lf", with_stdlib=False)


def test_score_hook_indexing_q_is_an_error():
    err = load_error(ATTN_DIMS + src("""\
        attention a(q: bf16[B, S, Hq, D], k: bf16[B, Skv, Hkv, D], v: bf16[B, Skv, Hkv, D]) -> bf16[B, S, Hq, D] {
            score = score + f32(q[b, 0, h, 0])
        }
        """))
    expect(err, 4, 25, "'q' is one of the block's q, k, v; hooks can index only its extra tensor parameters",
           hint="pass what the hook needs as an extra parameter")


def test_mask_hook_indexing_v_is_an_error():
    err = load_error(ATTN_DIMS + src("""\
        attention a(q: bf16[B, S, Hq, D], k: bf16[B, Skv, Hkv, D], v: bf16[B, Skv, Hkv, D],
                    keep: bool[B, Skv]) -> bf16[B, S, Hq, D] {
            mask = keep[b, kv_pos] and v[b, kv_pos, kv_h, 0] > 0.0
        }
        """))
    expect(err, 5, 32, "'v' is one of the block's q, k, v")
