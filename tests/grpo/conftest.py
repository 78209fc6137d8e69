"""Every module here shares compiled programs through JAX's persistent compilation cache
(see hf_fixtures.compilation_cache): tests build many engines and trainers with the same programs."""

import pytest
from hf_fixtures import compilation_cache, jax_cache_dir


@pytest.fixture(scope="module", autouse=True)
def _shared_compiles(tmp_path_factory):
    with compilation_cache(jax_cache_dir(tmp_path_factory)):
        yield
