"""Acceptance: plans of the shipped full-size architectures, built on the meta device."""
import re

import pytest


def names(report, pred):
    return {s.name for s in report.sites if pred(s)}


def test_sd35_medium(meta_report):
    r = meta_report("sd3.5-medium", batch=2, resolution=1024, text_tokens=333)
    t = r.totals()
    # 392 linears + the patch embedding conv (pos_embed.proj, 2x2 stride 2)
    assert (t["sites"], t["output_segmented"], t["input_segmented"], t["dualscale"]) == (393, 49, 61, 98)
    assert t["conv_sites"] == 1 and r.plan["pos_embed.proj"].conv.kernel == (2, 2)
    assert t["graphs"] == 1
    for s in r.sites:
        if s.name.endswith("norm1.linear"):
            block = int(s.name.split(".")[1])
            assert s.output_segments.sizes == (1536,) * (9 if block <= 12 else 6)
        if s.name.endswith("norm1_context.linear"):
            block = int(s.name.split(".")[1])
            assert s.output_segments.sizes == (1536,) * (2 if block == 23 else 6)
    assert r.plan["norm_out.linear"].output_segments.sizes == (1536, 1536)
    merged = names(r, lambda s: s.input_segments is not None and s.input_segments.pattern == "head_merge")
    assert len(merged) == 60
    assert all(re.search(r"(attn\.to_out\.0|attn\.to_add_out|attn2\.to_out\.0)$", n) for n in merged)
    assert all(r.plan[n].input_segments.sizes == (64,) * 24 for n in merged)
    ts = r.plan["time_text_embed.timestep_embedder.linear_1"].input_segments
    assert ts.sizes == (128, 128) and ts.pattern == "cat"
    dual = names(r, lambda s: s.dualscale.all)
    expected = {"time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_2",
                "norm_out.linear"}
    expected |= {f"transformer_blocks.{i}.{m}" for i in range(24) for m in ("norm1.linear", "norm1_context.linear",
                                                                             "ff.net.2")}
    expected |= {f"transformer_blocks.{i}.ff_context.net.2" for i in range(23)}
    assert dual == expected
    assert r.plan["transformer_blocks.0.ff.net.2"].dualscale.sources == ("gelu(approximate='tanh')",)
    assert r.plan["norm_out.linear"].dualscale.sources == ("silu",)


def test_flux1_dev(meta_report):
    r = meta_report("flux.1-dev", batch=1, resolution=1024, text_tokens=512)
    t = r.totals()
    assert (t["sites"], t["output_segmented"], t["input_segmented"], t["dualscale"], t["dualscale_partial"]) == \
        (504, 77, 78, 118, 38)
    for i in range(19):
        for m in ("norm1.linear", "norm1_context.linear"):
            assert r.plan[f"transformer_blocks.{i}.{m}"].output_segments.sizes == (3072,) * 6
        for m in ("attn.to_out.0", "attn.to_add_out"):
            seg = r.plan[f"transformer_blocks.{i}.{m}"].input_segments
            assert seg.sizes == (128,) * 24 and seg.pattern == "head_merge"
    for i in range(38):
        assert r.plan[f"single_transformer_blocks.{i}.norm.linear"].output_segments.sizes == (3072,) * 3
        site = r.plan[f"single_transformer_blocks.{i}.proj_out"]
        assert site.input_segments.sizes == (3072, 12288) and site.input_segments.pattern == "cat"
        assert site.dualscale.sources == (None, "gelu(approximate='tanh')")
    assert r.plan["norm_out.linear"].output_segments.sizes == (3072, 3072)
    for emb in ("timestep_embedder", "guidance_embedder"):
        assert r.plan[f"time_text_embed.{emb}.linear_1"].input_segments.sizes == (128, 128)
    for emb in ("timestep_embedder", "guidance_embedder", "text_embedder"):
        assert r.plan[f"time_text_embed.{emb}.linear_2"].dualscale.all


def test_pixart_sigma(meta_report):
    # 28 blocks x (attn1 4 + attn2 4 + ff 2) = 280, + caption_projection 2, + adaln_single
    # (timestep_embedder 2 + linear 1), + proj_out = 286.
    r = meta_report("pixart-sigma", batch=1, resolution=1024, text_tokens=300)
    t = r.totals()
    assert (t["sites"], t["output_segmented"], t["input_segmented"], t["dualscale"]) == (287, 1, 57, 31)
    assert t["conv_sites"] == 1 and r.plan["pos_embed.proj"].kind == "conv2d"   # + the patch embedding
    # the shared AdaLN linear, reshaped to (B, 6, D) and chunked on the 6-dim in every block
    seg = r.plan["adaln_single.linear"].output_segments
    assert seg.sizes == (1152,) * 6
    assert r.plan["adaln_single.linear"].dualscale.sources == ("silu",)
    assert r.plan["transformer_blocks.0.attn2.to_out.0"].input_segments.sizes == (72,) * 16
    assert r.plan["caption_projection.linear_2"].dualscale.sources == ("gelu(approximate='tanh')",)


def test_sdxl_unet(meta_report):
    # 70 transformer blocks (down 2x1 + 2x10, mid 10, up 3x10 + 3x2) x 10 linears = 700,
    # 11 Transformer2D proj_in/proj_out = 22, 17 resnet time_emb_proj, 4 embedding linears = 743.
    r = meta_report("sdxl-unet", batch=1, resolution=1024, text_tokens=77)
    t = r.totals()
    # + 51 conv2d sites (test_conv.py checks them): 156 input-segmented, 54 DualScale in all
    assert (t["sites"], t["conv_sites"], t["output_segmented"], t["input_segmented"], t["dualscale"]) == \
        (794, 51, 70, 156, 54)
    linears = [s for s in r.sites if s.kind == "linear"]
    assert (len(linears), sum(s.output_segments is not None for s in linears),
            sum(s.input_segments is not None for s in linears), sum(s.dualscale.all for s in linears)) == \
        (743, 70, 142, 19)
    ff = names(r, lambda s: s.output_segments is not None)
    assert all(n.endswith("ff.net.0.proj") for n in ff)  # GEGLU chunk(2)
    assert r.plan["add_embedding.linear_1"].input_segments.sizes == (1280, 1536)
    assert r.plan["time_embedding.linear_1"].input_segments.sizes == (160, 160)
    dual = names(r, lambda s: s.dualscale.all)
    assert sum(n.endswith("time_emb_proj") for n in dual) == 17
    # GEGLU's product is not an activation output: no DualScale on ff.net.2
    assert not any(n.endswith("ff.net.2") for n in dual)
