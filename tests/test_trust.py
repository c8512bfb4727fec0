"""What a demanding user tried and did not get (issue 27): each a wrong or unclear answer before."""
import json

import pytest
import torch
from torch import nn

import segquant_compile as sq
from conftest import Two, mha_fastpath


def _calibrated_two(options, calls=2):
    g = torch.Generator().manual_seed(0)
    model = Two()
    compiled = torch.compile(model, backend="segquant", options={"activations": "static", "inductor": False,
                                                                 **options})
    with torch.no_grad(), sq.calibrate(compiled, progress=False):
        for _ in range(calls):
            compiled(torch.randn(64, 8, generator=g))
    return model, compiled


def test_saved_options_plus_load_do_not_conflict_with_themselves(tmp_path):
    """The README's pattern: the options that were saved, plus `load` (a dict option included)."""
    options = {"formats": {"a": "float"}, "skip": ["nothing.*"]}
    model, compiled = _calibrated_two(options)
    sq.save(compiled, tmp_path / "q")
    x = torch.randn(4, 8)
    with torch.no_grad():
        here = compiled(x)
        again = torch.compile(model, backend="segquant", options={"activations": "static", "inductor": False,
                                                                 **options, "load": str(tmp_path / "q")})
        assert torch.equal(again(x), here)
    with pytest.raises(ValueError, match="conflicts"):   # a different mapping still conflicts
        sq.resolve_options({"formats": {"b": "float"}, "load": str(tmp_path / "q")})


@pytest.fixture
def saved_two(tmp_path):
    model, compiled = _calibrated_two({})
    sq.save(compiled, tmp_path / "q")
    return model, tmp_path / "q"


def _load_two(model, path):
    compiled = torch.compile(model, backend="segquant", options={"activations": "static", "inductor": False,
                                                                 "load": str(path)})
    with torch.no_grad():
        return compiled(torch.randn(4, 8))


def _edit_tensor(path, key, fn):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path / "tensors.safetensors"))
    tensors[key] = fn(tensors[key]).contiguous()
    save_file(tensors, str(path / "tensors.safetensors"))


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t * float("nan"), "not finite and positive"),
    (lambda t: t * 0, "not finite and positive"),
    (lambda t: -t, "not finite and positive"),
    (lambda t: t[:-1], "edited or damaged"),
])
@pytest.mark.parametrize("field", ["d_pos", "d_w"])
def test_load_refuses_damaged_steps_naming_file_and_entry(saved_two, edit, needle, field):
    model, path = saved_two
    _edit_tensor(path, f"b.{field}", edit)
    with pytest.raises(Exception, match=needle) as e:
        _load_two(model, path)
    assert "tensors.safetensors" in str(e.value) and "'b'" in str(e.value)


def test_load_refuses_a_cut_packed_weight_or_a_missing_key(saved_two):
    model, path = saved_two
    _edit_tensor(path, "a.packed", lambda t: t[:, :-1])
    with pytest.raises(Exception, match=r"'a.packed' is torch.int8 \(8, 15\).*edited or damaged"):
        _load_two(model, path)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["sites"]["a"]["fingerprint"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match=r"entry 'a' of .*manifest.json lacks \['fingerprint'\]"):
        _load_two(model, path)


@pytest.mark.parametrize("content,name,needle", [
    ("{not json", "sens.json", "is not a sensitivity measurement saved as .json"),
    ('{"format_version": 999}', "sens.json", "format_version 999"),
    ("[1, 2]", "sens.json", "is not a sensitivity measurement"),
    ("<html></html>", "sens.html", "the .html page is for reading"),
    (None, "missing.json", "does not exist"),
])
def test_a_bad_sensitivity_file_names_the_file_and_the_option(tmp_path, content, name, needle):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=needle) as e:
        sq.resolve_options({"format": "auto", "budget": {"weight_bits": 5}, "sensitivity": str(path)})
    assert str(path) in str(e.value) and "option 'sensitivity'" in str(e.value)


@pytest.mark.parametrize("make,needle", [
    (lambda d: d, "holds no model_index.json"),
    (lambda d: (d / "x.txt").write_text("x") and d, "holds no model_index.json"),
    (lambda d: d / "no" / "such" / "folder", "is not a folder"),
    (lambda d: "no/such/folder", "is not a folder"),   # relative: never taken for a hub id
    (lambda d: (d / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}') and d,
     "not a loadable diffusers pipeline"),
])
def test_quantize_with_a_bad_folder_exits_2_with_one_line(tmp_path, capsys, make, needle):
    from segquant_compile import cli
    folder = make(tmp_path)
    (tmp_path / "prompts.txt").write_text("a cat\n")
    try:
        code = cli.main(["quantize", str(folder), "--prompts", str(tmp_path / "prompts.txt"),
                         "--out", str(tmp_path / "out")])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if "segquant" in line and "error" in line]   # not diffusers' logging
    assert code == 2 and len(ours) == 1 and needle in ours[0] and "Traceback" not in err, err


class _CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.a(x)))))


class _SharedWeight(nn.Module):
    """One weight, two modules with their own biases."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.b = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.c.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.c(torch.relu(self.a(x)))))


@pytest.mark.parametrize("cls", [_CalledTwice, _SharedWeight])
def test_tied_weights_save_and_reload_bit_identical(tmp_path, cls):
    torch.manual_seed(0)
    model = cls()
    options = {"activations": "static", "inductor": False}
    compiled = torch.compile(model, backend="segquant", options=options)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), sq.calibrate(compiled, progress=False):
        for _ in range(2):
            compiled(torch.randn(64, 8, generator=g))
    x = torch.randn(4, 8)
    with torch.no_grad():
        here = compiled(x)
    assert sorted(r["site"] for r in sq.report(compiled).rows()) == ["a", "a#2", "b"]
    sq.save(compiled, tmp_path / "q")
    torch._dynamo.reset()
    again = torch.compile(model, backend="segquant", options={**options, "load": str(tmp_path / "q")})
    with torch.no_grad():
        assert torch.equal(again(x), here)
    if cls is _SharedWeight:   # each site is saved with its own bias, and a changed one is refused
        torch.manual_seed(0)
        other = cls()
        with torch.no_grad():
            other.a.bias.add_(1.0)
        again = torch.compile(other, backend="segquant", options={**options, "load": str(tmp_path / "q")})
        with pytest.raises(Exception, match="the bias of a differs"):
            again(x)


def test_save_after_a_dynamo_reset_says_what_happened(tmp_path):
    model, compiled = _calibrated_two({})
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=r"reset \(torch._dynamo.reset\(\)\).*call the compiled model once more"):
        sq.save(compiled, tmp_path / "q")
    with torch.no_grad():
        compiled(torch.randn(4, 8))   # the kept calibration: no recalibration needed
    sq.save(compiled, tmp_path / "q")


class _Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.same = nn.Conv2d(8, 8, 3, padding="same")
        self.plain = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.plain(self.same(self.dilated(self.grouped(x))))


def test_report_gives_one_true_reason_per_module():
    model = _Convs().eval()
    compiled = torch.compile(model, backend="segquant", options={"inductor": False})
    with torch.no_grad():
        compiled(torch.randn(1, 8, 8, 8))
    r = sq.report(compiled)
    assert r.unreached == {}                               # every module was traced
    reasons = {c.name: c.reason for c in r.float_calls}
    assert set(reasons) == {"grouped", "dilated", "same"}
    assert "groups=2" in reasons["grouped"] and "dilation=(2, 2)" in reasons["dilated"] and "'same'" in reasons["same"]
    text = str(r)
    for name in ("grouped", "dilated", "same"):
        assert sum(line.startswith(f"float: {name} ") for line in text.splitlines()) == 1, text
    assert "never reached" not in text


@pytest.fixture
def fast_path():
    """torch's fused encoder fast path on (other tests and mnist_vit turn it off process-wide)."""
    with mha_fastpath(True):
        yield


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, activation="gelu")
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def test_transformer_encoder_fast_path_is_quantized(fast_path):
    """eval + no_grad: torch runs each layer as one fused op; its four linears are sites all the same."""
    from segquant_compile.lowering.quantize import sqnr_db
    model = _encoder()
    x = torch.randn(2, 10, 32)
    compiled = torch.compile(model, backend="segquant")
    with torch.no_grad():
        ref, out = model(x), compiled(x)
    r = sq.report(compiled)
    assert len(r.states) == 8 and not r.fallbacks and not r.float_calls and not r.unreached
    assert sqnr_db(ref, out) > 30


def test_fused_fast_path_left_fused_is_said_at_compile_time(fast_path):
    model = _encoder()
    x = torch.randn(2, 10, 32)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, -2:] = True
    compiled = torch.compile(model, backend="segquant")
    with torch.no_grad(), pytest.warns(UserWarning, match=r"stay float: inside the opaque op .*masked"):
        compiled(x, src_key_padding_mask=mask)
    r = sq.report(compiled)
    assert {c.name for c in r.float_calls} >= {"layers.0.self_attn.in_proj", "layers.0.linear1"}
    assert not r.unreached


def test_two_threads_making_the_first_call_decide_on_one_call(monkeypatch):
    """A graph already compiled (dynamo's compile lock no longer serialises), new weights, two
    threads at once: the first-call decision is taken once, on one call's rows."""
    import copy
    import threading
    import time

    from segquant_compile.state import QuantState

    torch.manual_seed(0)
    first, model = Two(), Two()
    fn = torch.compile(lambda m, x: m(x), backend="segquant", options={"inductor": False})
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(64, 8, generator=g), torch.rand(64, 8, generator=g) * 3 - 1]
    probe = torch.randn(16, 8, generator=g)
    with torch.no_grad():
        fn(first, xs[0])                          # the graph is compiled: later first calls only run it
        copies = [copy.deepcopy(model) for _ in xs]
        expected = []
        for c, x in zip(copies, xs):              # each thread's call alone, first
            fn(c, x)
            expected.append(fn(c, probe))
    observe = QuantState.observe

    def slow_observe(self, x):                    # widen the window in which both calls observe
        time.sleep(0.2)
        observe(self, x)
    monkeypatch.setattr(QuantState, "observe", slow_observe)
    barrier = threading.Barrier(2)

    def call(x):
        barrier.wait()
        with torch.no_grad():
            fn(model, x)
    threads = [threading.Thread(target=call, args=(x,)) for x in xs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with torch.no_grad():
        got = fn(model, probe)
    assert any(torch.equal(got, e) for e in expected)
    assert not torch.equal(expected[0], expected[1])   # the two calls' rows decide differently


def test_a_weight_edit_under_static_steps_warns_once_and_marks_the_report():
    """A LoRA-style merge through .data into a layer feeding a quantized site: its static steps
    were calibrated on the old weights."""
    model, compiled = _calibrated_two({})
    x = torch.randn(4, 8)
    with torch.no_grad():
        model.a.weight.data += 3 * torch.randn_like(model.a.weight)   # a's outputs (b's input) grow
        with pytest.warns(UserWarning, match=r"weight\(s\) a edited after static calibration.*recalibrate=True"):
            compiled(x)
        import warnings
        with warnings.catch_warnings(record=True) as again:   # once per edit
            warnings.simplefilter("always")
            compiled(x)
        assert not [w for w in again if "segquant" in str(w.message)]
    r = sq.report(compiled)
    assert "STALE STEPS" in str(r) and r.states["b"].summary()["stale_steps"].startswith("calibrated before a")
    assert "stale_steps" not in r.states["a"].summary()   # a's own input is as calibrated
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), sq.calibrate(compiled, progress=False, recalibrate=True):
        compiled(torch.randn(64, 8, generator=g))
    assert "STALE STEPS" not in str(sq.report(compiled))


class _Block(nn.Module):
    def __init__(self, graph_break: bool):
        super().__init__()
        self.proj, self.graph_break = nn.Linear(16, 16), graph_break

    def forward(self, x):
        if self.graph_break:
            torch._dynamo.graph_break()
        return torch.relu(self.proj(x))


class _Nested(nn.Module):
    """A top-level `proj` beside blocks.N.proj."""

    def __init__(self, graph_break: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(graph_break) for _ in range(2)])
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.proj(x)


def _formats_run(graph_break, formats):
    torch.manual_seed(0)
    model = _Nested(graph_break)
    compiled = torch.compile(model, backend="segquant", options={"formats": formats, "inductor": False})
    with torch.no_grad():
        compiled(torch.randn(4, 16))
    r = sq.report(compiled)
    return {name: "quantized" if name in r.states else r.fallbacks.get(name) or r.unreached[name]
            for name in ("blocks.0.proj", "blocks.1.proj", "proj")}


@pytest.mark.parametrize("graph_break", [False, True])
def test_a_formats_entry_applies_to_the_sites_it_names_only(graph_break):
    if not graph_break:
        got = _formats_run(False, {"blocks.0.proj": "float"})
        assert got["proj"] == "quantized" and got["blocks.1.proj"] == "quantized"
        assert got["blocks.0.proj"].startswith("format 'float'")
        return
    got = _formats_run(True, {"blocks.*.proj": "float"})   # every block alike: one graph serves them all
    assert got["proj"].startswith("never reached")          # dynamo runs the loop around the break eagerly
    assert all(got[f"blocks.{i}.proj"].startswith("format 'float'") for i in range(2))
    with pytest.raises(Exception, match=r"give blocks.1.proj int8, but it runs in the graph compiled for "
                                        r"blocks.0.proj \(float\)"):
        _formats_run(True, {"blocks.0.proj": "float"})
