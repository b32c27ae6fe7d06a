"""The status words of OME's model contract, spelled exactly as OME writes and compares them.

Invariants:
- every member's value is OME's own string, byte for byte (a ``StrEnum``: a member *is* that ``str``, so it
  compares, hashes, formats and serialises as the word itself);
- :class:`ModelStatus` is one node's word for one model (the value of its node label and the ``status`` of its
  ConfigMap entry); an agent writes only :data:`WRITTEN_STATUSES` — ``Deleted`` is a word OME's controller reads,
  while a deletion is reported by removing the key and the label;
- :class:`LifecycleState` is the model custom resource's ``status.state``, which OME's controller derives from
  the nodes' statuses (``Ready`` if any node is Ready, else ``Failed`` if any failed, else ``In_Transit``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class ModelStatus(StrEnum):
    """OME's ``ModelStatus`` (``pkg/modelagent/model_data.go``): one model on one node."""

    READY = "Ready"
    UPDATING = "Updating"
    FAILED = "Failed"
    DELETED = "Deleted"


WRITTEN_STATUSES: Final = (ModelStatus.READY, ModelStatus.UPDATING, ModelStatus.FAILED)
"""The statuses an agent writes (node-label values, entry ``status``), in OME's order."""


class LifecycleState(StrEnum):
    """OME's ``LifeCycleState``: the enum of a BaseModel's / ClusterBaseModel's ``status.state``."""

    CREATING = "Creating"
    IMPORTING = "Importing"
    IN_TRANSIT = "In_Transit"
    IN_TRAINING = "In_Training"
    READY = "Ready"
    FAILED = "Failed"
