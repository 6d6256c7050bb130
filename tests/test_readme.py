"""The README's drop-in example runs as printed (on a few random batches) and keeps its promises."""
import os
import re

import torch

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _drop_in_example() -> str:
    with open(README) as f:
        match = re.search(r"## Drop-in example\n\n```python\n(.*?)```", f.read(), re.S)
    assert match, "README lost its '## Drop-in example' python block"
    return match.group(1)


def test_drop_in_example_runs_and_compacts_to_the_same_outputs(tmp_path):
    gen = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(3)]
    scope = {"loader": loader}
    exec(compile(_drop_in_example(), "README.md", "exec"), scope)
    model, small = scope["model"].eval(), scope["small"].eval()
    x = torch.randn(4, 1, 28, 28, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    import cadk

    paths = cadk.save_compact(small, x[:1], str(tmp_path / "net"))  # the line after the block
    assert sorted(os.path.basename(p) for p in paths.values()) == ["net.pt", "net.pt2", "net.ts"]
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(paths["torchscript"])(x), small(x))
