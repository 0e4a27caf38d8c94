"""make dist-check's checks of the built packages and of dense-ops as installed from them.

    python -I tests/dist_check.py --source REPO SDIST WHEEL

Run with -I from outside the source tree, so that `import dense_ops` can only find the installed
package. Checks: the sdist carries every file under csrc/ and what the build reads; the sdist's
metadata accepts the supported torch range and the wheel's requires exactly the torch it was
built against (the import check's rule); the installed package runs a dense block forward and
backward and a condensed CondenseNet, both equal to the pure-PyTorch reference.
"""
import argparse
import email.parser
import sysconfig
import tarfile
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

import torch
from packaging.requirements import Requirement  # pytest's dependency too

SOURCE_FILES = ["setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"]


def torch_requirement(metadata_text: str) -> set[str]:
    """The version clauses of the metadata's torch requirement, e.g. {'>=2.11', '<2.16'}."""
    requires = [Requirement(line) for line in email.parser.Parser().parsestr(metadata_text).get_all("Requires-Dist")]
    torch_requires = [r for r in requires if r.name == "torch"]
    assert len(torch_requires) == 1, f"expected one torch requirement, got {[str(r) for r in requires]}"
    return {str(clause) for clause in torch_requires[0].specifier}


def check_sdist(sdist: Path, source: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        root = names[0].split("/")[0]
        packed = {name[len(root) + 1:] for name in names}
        pkg_info = tar.extractfile(f"{root}/PKG-INFO").read().decode()
    wanted = SOURCE_FILES + [str(p.relative_to(source)) for p in sorted((source / "csrc").rglob("*")) if p.is_file()]
    missing = [name for name in wanted if name not in packed]
    assert not missing, f"{sdist.name} lacks files the build needs: {missing}"
    config = tomllib.loads((source / "pyproject.toml").read_text())["tool"]["dense-ops"]
    expected = {f">={config['torch-min']}", f"<{config['torch-below']}"}
    found = torch_requirement(pkg_info)
    assert found == expected, f"the sdist requires torch {found}, expected the supported range {expected}"
    print(f"sdist: {len(wanted)} build files present ({len(packed)} entries); requires torch {sorted(found)}")


def check_wheel(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        found = torch_requirement(archive.read(metadata).decode())
        extension = [n for n in archive.namelist() if n.startswith("dense_ops/_C") and n.endswith(".so")]
    expected = {f"=={torch.__version__.split('+')[0]}"}
    assert found == expected, f"the wheel requires torch {found}, expected {expected} (the torch it was built with)"
    assert extension, f"{wheel.name} has no compiled extension dense_ops/_C*.so"
    print(f"wheel: requires torch {sorted(found)}; carries {extension[0]}")


def check_installed() -> None:
    import dense_ops
    from dense_ops import reference

    location = Path(dense_ops.__file__).resolve()
    site = Path(sysconfig.get_paths()["platlib"]).resolve()
    assert site in location.parents, f"dense_ops imported from {location}, not from this environment's {site}"
    print(f"installed: dense_ops {dense_ops.__version__} from {location.parent}, build {dense_ops.build_info()}")

    torch.manual_seed(0)
    naive = reference.DenseBlock(num_layers=3, num_input_features=8, bn_size=4, growth_rate=4).double()
    ours = dense_ops.DenseBlock(num_layers=3, num_input_features=8, bn_size=4, growth_rate=4, drop_rate=0.0).double()
    ours.load_state_dict(naive.state_dict(), strict=True)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    grads = []
    for block in (ours, naive):
        xi = x.clone().requires_grad_(True)
        out = block(xi)
        out.square().sum().backward()
        grads.append((out, xi.grad, block.denselayer1.conv1.weight.grad))
    for ours_value, naive_value in zip(*grads):
        torch.testing.assert_close(ours_value, naive_value, rtol=1e-9, atol=1e-9)
    print("dense block: forward and backward equal the reference (float64)")

    model = dense_ops.models.condensenet_cifar(depth=8, num_classes=5).double()
    dense_ops.update_condensation(model, progress=1.0)  # every condensation stage done
    model.eval()
    fast = dense_ops.condense(model, prune_classifier=False)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-9, atol=1e-9)
    print("condensed CondenseNet: outputs equal the training-form model's (float64)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="the source tree the packages were built from")
    parser.add_argument("sdist", type=Path)
    parser.add_argument("wheel", type=Path)
    args = parser.parse_args()
    source = args.source.resolve()
    check_sdist(args.sdist, source)
    check_wheel(args.wheel)
    check_installed()
    print("dist-check: passed")


if __name__ == "__main__":
    main()
