"""``modelherd status`` pairs a model with the Lease of its download by the Lease's identity, never by a near match."""

from __future__ import annotations

from modelherd.agent.views import same_download
from modelherd.coordination.leaseviews import LeaseView


def _lease(source: str, dest: str) -> LeaseView:
    return LeaseView(name="mh-m-0", holder="n1", phase="Downloading", bytes_done=1, bytes_total=2, transitions=0,
                     source=source, dest=dest, updated="")


def test_a_lease_pairs_with_the_model_of_its_canonical_source_and_destination() -> None:
    lease = _lease("hf://org/m@v1", "org/m")
    assert same_download(lease, "hf://org/m@v1", "/mnt/models/org/m")
    assert same_download(lease, "hf://org/m/@v1", "/data/org/m")  # the canonical form, as the agent writes it


def test_near_matches_are_not_the_same_download() -> None:
    lease = _lease("hf://org/m@v1", "org/m")
    assert not same_download(lease, "hf://org/m@v2", "/mnt/models/org/m")  # another revision
    assert not same_download(lease, "hf://org/m", "/mnt/models/org/m")
    assert not same_download(lease, "hf://org/m@v1", "/mnt/models/xorg/m")  # a suffix of a name, not of the path
    assert not same_download(lease, "hf://org/m@v1", "org/m")
    assert not same_download(lease, "hf://org/m@v1", "")
    assert not same_download(lease, "not a uri", "/mnt/models/org/m")


def test_a_destination_outside_the_models_root_is_compared_whole() -> None:
    lease = _lease("oci://n/ns/b/bk/o/llama/", "/elsewhere/llama")
    assert same_download(lease, "oci://n/ns/b/bk/o/llama/", "/elsewhere/llama")
    assert not same_download(lease, "oci://n/ns/b/bk/o/llama/", "/mnt/elsewhere/llama")
