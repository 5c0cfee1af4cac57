"""Package layout for setuptools (everything else is declared in pyproject.toml).

The target table (``targets/``) and the C runtime's sources (``runtime/``) stay at the
repository's top level, where the project keeps them; the wheel ships them inside the
package as ``qos_compile/_data/targets`` and ``qos_compile/_data/runtime`` (package-dir
mapping, so git holds one copy). ``qos_compile.resources.data_dir`` finds either place.
The file globs are ``[tool.setuptools.package-data]`` in pyproject.toml.

The packages are listed in code because pyproject.toml cannot combine automatic
discovery with extra mapped packages.
"""
from setuptools import find_namespace_packages, setup

#: Package name of each top-level data folder inside the installed package.
DATA_PACKAGES = {
    "qos_compile._data.targets": "targets",
    "qos_compile._data.runtime": "runtime",
}
#: Sub-folders of the data folders that hold files to ship (their C sources).
DATA_SUBPACKAGES = ("qos_compile._data.runtime.tests", "qos_compile._data.runtime.fuzz")

# Namespace discovery also lists the data-only folders inside qos_compile/ (tvm/shim,
# multipliers/data), so setuptools ships their files as the package data they are.
setup(
    packages=[
        *find_namespace_packages(include=["qos_compile", "qos_compile.*"], exclude=["*.__pycache__"]),
        *DATA_PACKAGES,
        *DATA_SUBPACKAGES,
    ],
    package_dir=dict(DATA_PACKAGES),
)
