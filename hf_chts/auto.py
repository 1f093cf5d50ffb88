"""Auto classes that load any saved sparse model, full or compact, with its masks.

In the spirit of PEFT's ``AutoPeftModelForCausalLM``: ``AutoSparseModelForCausalLM.from_pretrained(path)``
reads ``config.json`` (the model type and, in ``sparsity``, the settings that trained the model), picks the
class transformers registers for that model type and head, loads the weights, and gives every layer that has
a mask in the checkpoint its ``weight_mask`` buffer and the masked forward. It takes both checkpoint formats
(``save_pretrained``, and ``hf-chts export --format compact``) of any architecture (GPT-2, LLaMA,
``sparse_llama``, ...), and is quiet: the masks never appear in the loader's UNEXPECTED report.

A plain ``AutoModelForCausalLM.from_pretrained`` of a ``save_pretrained`` folder loads the same weights (the
masked ones are 0.0) but drops the masks, so training on would make the model dense again.

Example:

```python
>>> from hf_chts import AutoSparseModelForCausalLM
>>> model = AutoSparseModelForCausalLM.from_pretrained("out/gpt2-chtss")  # doctest: +SKIP
>>> model.config.sparsity["method"]  # doctest: +SKIP
```
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .compact import load_sparse_model, model_class_for

__all__ = [
    "AutoSparseModel",
    "AutoSparseModelForCausalLM",
    "AutoSparseModelForQuestionAnswering",
    "AutoSparseModelForSeq2SeqLM",
    "AutoSparseModelForSequenceClassification",
    "AutoSparseModelForTokenClassification",
]


class AutoSparseModel:
    """Load a saved sparse model (either format, any architecture) with its masks; base model head.

    Subclasses name the transformers mapping of their head (``MODEL_FOR_CAUSAL_LM_MAPPING``, ...).
    """

    mapping_name = "MODEL_MAPPING"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(
            f"{type(self).__name__} is not instantiated; use {type(self).__name__}.from_pretrained."
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        token: str | None = None,
    ) -> torch.nn.Module:
        """Load the sparse model of a folder (or a Hub repository, downloaded first).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a folder written by ``save_pretrained`` or
                ``hf-chts export --format compact``, or a Hub repository id.
            device (`str` or `torch.device`, defaults to ``"cpu"``): where the model goes.
            dtype (`torch.dtype`, *optional*): cast the weights (the masks stay bool).
            revision, token: for a Hub repository.

        Returns:
            the model in eval mode, masked layers carrying their ``weight_mask`` buffers.

        Raises:
            ValueError: no class of this head for the model type, a file that does not match its config, or
                weights that are non-zero at masked positions (naming the fix).
        """
        import transformers
        from transformers import AutoConfig

        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(str(pretrained_model_name_or_path), revision=revision, token=token)
            )
        config = AutoConfig.from_pretrained(folder)
        model_class = model_class_for(config, getattr(transformers, cls.mapping_name))
        return load_sparse_model(folder, device=device, dtype=dtype, model_class=model_class)


class AutoSparseModelForCausalLM(AutoSparseModel):
    """:class:`AutoSparseModel` with a causal language-modelling head (``AutoModelForCausalLM``)."""

    mapping_name = "MODEL_FOR_CAUSAL_LM_MAPPING"


class AutoSparseModelForSeq2SeqLM(AutoSparseModel):
    """:class:`AutoSparseModel` with a sequence-to-sequence head (``AutoModelForSeq2SeqLM``)."""

    mapping_name = "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING"


class AutoSparseModelForSequenceClassification(AutoSparseModel):
    """:class:`AutoSparseModel` with a sequence-classification head."""

    mapping_name = "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING"


class AutoSparseModelForTokenClassification(AutoSparseModel):
    """:class:`AutoSparseModel` with a token-classification head."""

    mapping_name = "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING"


class AutoSparseModelForQuestionAnswering(AutoSparseModel):
    """:class:`AutoSparseModel` with an extractive question-answering head."""

    mapping_name = "MODEL_FOR_QUESTION_ANSWERING_MAPPING"
