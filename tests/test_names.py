"""Parameter names from dynamo placeholders: one function, every spelling."""
import torch
from torch import nn

from segquant_compile.capture import capture_graphs
from segquant_compile.passes import param_names, source_to_name


def test_source_spellings():
    assert source_to_name("L['self']._modules['blocks']._modules['0']._parameters['weight']") == "blocks.0.weight"
    assert source_to_name("L['self'].pos_embed.proj.weight") == "pos_embed.proj.weight"
    assert source_to_name("L['fn'].__dict__['_modules']['a']._buffers['b']") == "a.b"
    assert source_to_name("L['model']._modules['to_out']._modules['0']._parameters['bias']") == "to_out.0.bias"


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_out = nn.ModuleList([nn.Linear(4, 4)])
        self.linear_1 = nn.Linear(4, 4)
        self.register_buffer("my_modules_buf", torch.ones(4))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Inner(), Inner()])
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x):
        for b in self.blocks:
            x = b.linear_1(b.to_out[0](x)) * b.my_modules_buf
        return x * self.weight


def test_param_names_from_graph():
    (gm, _), = capture_graphs(Outer(), (torch.randn(2, 4),), {})
    names = set(param_names(gm).values())
    expected = {f"blocks.{i}.{p}" for i in range(2) for p in
                ("to_out.0.weight", "to_out.0.bias", "linear_1.weight", "linear_1.bias", "my_modules_buf")}
    assert expected | {"weight"} == names
    # user inputs are never weights
    assert all(not n.startswith("x") for n in names)


def test_function_root():
    lin = nn.Linear(4, 3)

    def fn(x):
        return lin(x)
    (gm, _), = capture_graphs(fn, (torch.randn(2, 4),), {})
    assert set(param_names(gm).values()) >= {"weight", "bias"} or \
        any(v.endswith("weight") for v in param_names(gm).values())
