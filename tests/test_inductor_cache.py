"""Inductor's on-disk cache and segquant's op schemas (segquant_compile/inductor_cache.py): a warm
cache must not hand back code that calls a `segquant::` op as an older schema did."""
import torch
from torch import nn

from segquant_compile import inductor_cache


def _compile_and_run(monkeypatch, tmp_path):
    """Compile a small model with segquant in a fresh dynamo, with `tmp_path` as Inductor's cache;
    returns (output, whether the compiled graph came from the cache)."""
    from torch._dynamo.utils import counters
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    # config.patch, not monkeypatch: a config module's attribute restored by monkeypatch is deleted
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=True):
        out = torch.compile(model, backend="segquant")(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)))
    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    misses = counters["inductor"]["fxgraph_cache_miss"]
    return out, hits, misses


def test_a_changed_op_schema_misses_the_warm_cache(monkeypatch, tmp_path):
    """The same model compiled again reuses the cached graph; with the ops' key changed (what a
    schema change does) it compiles anew, and gives the same output."""
    first, hits, misses = _compile_and_run(monkeypatch, tmp_path)
    assert misses > 0 and hits == 0
    again, hits, misses = _compile_and_run(monkeypatch, tmp_path)
    assert hits > 0 and misses == 0 and torch.equal(again, first)
    monkeypatch.setattr(inductor_cache, "ops_key", lambda: "another schema")
    changed, hits, misses = _compile_and_run(monkeypatch, tmp_path)
    assert misses > 0 and hits == 0 and torch.equal(changed, first)
    assert torch._inductor.config.fx_graph_cache is not None   # the config is left as it was


def test_the_key_names_every_segquant_op_schema_and_keeps_the_users_pass(monkeypatch):
    from torch._inductor.custom_graph_pass import CustomGraphPass
    import segquant_compile.lowering.ops  # noqa: F401  (registers the ops)
    key = inductor_cache.ops_key()
    assert key == inductor_cache.ops_key() and len(key) == 64
    schemas = torch._C._jit_get_all_schemas()
    ours = [s for s in schemas if s.name.startswith("segquant::")]
    assert len(ours) >= 5

    class Schema:   # what a changed schema reads as (registering a real op would change the key for every later test)
        name = "segquant::conv2d_dynamic"

        def __str__(self):
            return "segquant::conv2d_dynamic(Tensor x) -> Tensor"
    monkeypatch.setattr(torch._C, "_jit_get_all_schemas", lambda: [*schemas, Schema()])
    assert inductor_cache.ops_key() != key
    monkeypatch.setattr(torch._C, "_jit_get_all_schemas",
                        lambda: [*(s for s in schemas if not s.name.startswith("segquant::")), *ours[1:]])
    assert inductor_cache.ops_key() != key   # one schema fewer
    monkeypatch.undo()
    assert inductor_cache.ops_key() == key

    ran = []

    class UserPass(CustomGraphPass):
        def __call__(self, graph):
            ran.append(graph)

        def uuid(self):
            return "the user's pass"
    with torch._inductor.config.patch(post_grad_custom_post_pass=UserPass()):
        ours = inductor_cache.config_patches()["post_grad_custom_post_pass"]
    assert ours.uuid()[2] == "the user's pass"
    ours("graph")
    assert ran == ["graph"]
    with torch._inductor.config.patch(post_grad_custom_post_pass=lambda graph: None):
        assert inductor_cache.config_patches() == {}   # a plain callable: Inductor bypasses its cache
    assert torch._inductor.config.post_grad_custom_post_pass is None
