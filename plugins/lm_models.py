"""``hf_causal_lm``: a Hugging Face causal language model as a kdforge student or teacher (optionally LoRA).

transformers (and peft, for LoRA) are imported inside the factory, never when kdforge
loads its plugins; without them the plugin is listed as unavailable with the install
command. The model is wrapped so that it takes ``(input_ids, attention_mask=None)`` and
returns the logits, taps are the Hugging Face module names (``transformer.h.1``), and a
trained student exports itself with ``save_pretrained`` when the run ends.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import shutil
from pathlib import Path
from typing import Annotated, Any, Iterable, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kdforge import Batch, RecipeError, RunContext, did_you_mean, hookimpl, unavailable

from kdforge.plugins.lm_task import IGNORE_INDEX, lm_batch

INSTALL = "pip install 'kdforge[lm]'"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT_DIR, LORA_DIR, BASE_DIR = "hf", "hf-lora", "hf-base"
TOKENIZER_DIR = "tokenizer"  # where the text datasets save the run's tokenizer


class LoraSpec(BaseModel):
    """LoRA adapters (peft): rank ``r``, scaling ``alpha``, ``dropout``, the modules to adapt."""

    model_config = ConfigDict(extra="forbid")

    r: Annotated[int, Field(ge=1)] = 8
    alpha: Annotated[float, Field(gt=0.0)] = 16.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    target_modules: list[str] | None = None  # None: peft's default for the architecture



@contextlib.contextmanager
def _no_transformers_bars() -> Iterator[None]:
    """transformers' and huggingface_hub's progress bars off, then each put back as it was.

    transformers' switch also flips the hub's, so the hub's own setting is restored separately
    (a user who turned off only the hub's bars keeps them off).
    """
    import warnings

    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    bars, hub_bars = hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the hub's "cannot enable" when HF_HUB_DISABLE_PROGRESS_BARS=1
            if bars:
                hf_logging.enable_progress_bar()
            if hub_bars:
                hub_utils.enable_progress_bars()
            else:
                hub_utils.disable_progress_bars()

class HFCausalLM(nn.Module):
    """A Hugging Face causal LM (``self.hf``, a PreTrainedModel or a peft model) as a kdforge model.

    ``forward(input_ids, attention_mask=None)`` returns the logits ``(batch, seq, vocab)``.
    Tap names are those of the underlying transformers model (LoRA wrappers left out), so
    ``transformer.h.1`` names the second GPT-2 block with or without adapters.
    """

    def __init__(self, hf: nn.Module, *, lora: bool = False, base_path: str | None = None) -> None:
        super().__init__()
        self.hf = hf
        self.lora = lora
        self.base_path = base_path

    @property
    def base(self) -> nn.Module:
        """The transformers model (inside the peft wrapper for a LoRA model)."""
        return self.hf.get_base_model() if self.lora else self.hf

    @property
    def config(self) -> Any:
        """The transformers config."""
        return self.base.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @torch.no_grad()
    def generate(self, **kwargs: Any) -> torch.Tensor:
        """``model.generate`` of transformers (no gradient)."""
        return self.hf.generate(**kwargs)

    # -- taps (kdforge.RenamesTaps) ----------------------------------------------------------
    def get_submodule(self, target: str) -> nn.Module:
        """A module by its transformers name; names of this wrapper itself (``hf...``) work too."""
        if not target:
            return self
        try:
            return self.base.get_submodule(target)
        except AttributeError:
            return super().get_submodule(target)

    def tap_names(self) -> Iterable[str]:
        """Every module name of the transformers model."""
        return [name for name, _ in self.base.named_modules() if name]

    # -- special tokens and export --------------------------------------------------------------
    def set_special_tokens(self, eos_token_id: int | None = None, pad_token_id: int | None = None,
                           bos_token_id: int | None = None) -> None:
        """Record the tokenizer's special token ids in the config and generation config (for generate and exports)."""
        for holder in (self.base.config, getattr(self.base, "generation_config", None)):
            if holder is None:
                continue
            for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id),
                                ("bos_token_id", bos_token_id)):
                if value is not None:
                    setattr(holder, name, int(value))

    def export(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
        """``save_pretrained`` folders under ``directory``: the model (LoRA merged in), and the adapters for LoRA.

        ``state_dict`` (this wrapper's keys, ``hf.``...) replaces the module's own weights, for
        sharded models whose full weights were gathered first.
        """
        with _no_transformers_bars():  # a "Writing model shards" bar under the run's own (and under --quiet)
            return self._export(directory, state_dict)

    def _export(self, directory: Path, state_dict: dict[str, torch.Tensor] | None) -> dict[str, str]:
        written: dict[str, str] = {}
        target = directory / EXPORT_DIR
        if self.lora:
            self.hf.save_pretrained(str(directory / LORA_DIR))
            written["export/lora"] = str(directory / LORA_DIR)
            if self.base_path is None:  # built from a config: the adapters need their (untrained) base
                copy.deepcopy(self.hf).unload().save_pretrained(str(directory / BASE_DIR))
                written["export/base"] = str(directory / BASE_DIR)
            merged = copy.deepcopy(self.hf).merge_and_unload()
            merged.save_pretrained(str(target))
        elif state_dict is not None:
            own = {k[len("hf."):]: v for k, v in state_dict.items() if k.startswith("hf.")}
            self.hf.save_pretrained(str(target), state_dict=own)
        else:
            self.hf.save_pretrained(str(target))
        written["export/hf"] = str(target)
        tokenizer = directory / TOKENIZER_DIR
        if tokenizer.is_dir():  # AutoTokenizer.from_pretrained(<export>) works too
            for folder in [target] + ([directory / LORA_DIR] if self.lora else []):
                for item in tokenizer.iterdir():
                    if item.is_file():
                        shutil.copy2(item, folder / item.name)
        return written

    def on_fit_end(self, run: RunContext) -> dict[str, str] | None:
        """The run's student exports itself (main process); as a teacher it writes nothing.

        Under FSDP every process first takes part in gathering the full weights (untested on
        GPUs; LoRA exports are skipped there).
        """
        if run.student is not self:
            return None
        state = None
        if "FSDP" in str(getattr(run.accelerator, "distributed_type", "")):
            if self.lora:
                return {"export/skipped": "LoRA exports under FSDP are not supported yet"} if run.is_main_process else None
            state = run.accelerator.get_state_dict(self)
        if not run.is_main_process:
            return None
        return self.export(Path(run.run_dir), state)


def _config_model(config: dict[str, Any], num_classes: int | None, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    spec = dict(config)
    model_type = spec.pop("model_type", None)
    if not isinstance(model_type, str):
        raise RecipeError("needs model_type (e.g. gpt2, llama, qwen2)", key=".config.model_type")
    if model_type not in CONFIG_MAPPING:
        raise RecipeError(f"unknown transformers model_type {model_type!r}.{did_you_mean(model_type, list(CONFIG_MAPPING.keys()))}",
                          key=".config.model_type")
    if "vocab_size" not in spec:
        if num_classes is None:
            raise RecipeError("needs vocab_size (or a dataset that reports its tokenizer's size)", key=".config")
        spec["vocab_size"] = int(num_classes)
    for name in ("bos_token_id", "eos_token_id"):  # defaults of a pretrained vocabulary mean nothing here
        spec.setdefault(name, None)
    try:
        hf_config = AutoConfig.for_model(model_type, **spec)
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"transformers cannot build a {model_type} model from this config: {exc}", key=".config") from None


def _pretrained_model(path: str, download: bool, dtype: torch.dtype | str, revision: str | None) -> tuple[nn.Module, str]:
    from transformers import AutoModelForCausalLM

    local = Path(path).expanduser()
    if not local.is_dir() and not download:
        raise RecipeError(f"no local model directory at {path!r}; to fetch {path!r} from the Hugging Face Hub, "
                          f"set download: true", key=".path")
    source = str(local) if local.is_dir() else path
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=not download, revision=revision)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"cannot load a causal language model from {path!r}: {first[:300]}", key=".path") from None
    return model, source


def _apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RecipeError(f"LoRA needs peft: {INSTALL}", key=".lora") from None
    config = LoraConfig(task_type="CAUSAL_LM", r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise RecipeError(f"peft cannot add LoRA adapters: {exc}", key=".lora") from None


def hf_causal_lm(
    path: str | None = None,
    config: dict[str, Any] | None = None,
    num_classes: Annotated[int, Field(ge=1)] | None = None,
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32",
    download: bool = False,
    revision: str | None = None,
    lora: LoraSpec | None = None,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """A Hugging Face causal LM: ``path`` (a local directory) or ``config`` (freshly initialized); optional LoRA.

    ``config`` is a transformers config mapping with ``model_type`` (``{model_type: gpt2,
    n_layer: 2, n_embd: 128, n_head: 2}``); its vocab size is the dataset tokenizer's
    (``num_classes``) unless it sets ``vocab_size``. ``path`` never touches the network
    unless ``download: true`` (then it may be a Hub id). ``lora`` trains only adapters
    (peft); the run's ``hf/`` folder then holds the merged model and ``hf-lora/`` the adapters.
    """
    if (path is None) == (config is None):
        raise RecipeError("give exactly one of path (a model directory) and config (a fresh model)", key=".path")
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    if config is not None:
        if dtype == "auto":
            raise RecipeError("dtype auto needs a path to read it from; pick float32, bfloat16 or float16", key=".dtype")
        model, base_path = _config_model(config, num_classes, torch_dtype), None
    else:
        model, base_path = _pretrained_model(path, download, torch_dtype, revision)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora is not None:
        model = _apply_lora(model, lora)
    return HFCausalLM(model, lora=lora is not None, base_path=base_path)


# -- the hf_generate generator ------------------------------------------------------------------
class HFGenerate:
    """Complete each prompt of a batch with ``model.generate`` (transformers); the completion becomes the target.

    The prompt of sample ``i`` is its first ``prompt_length[i]`` tokens (the batch field that
    ``prompt_completion`` provides), else its first ``prompt_tokens``. Sampling is plain
    ancestral sampling at ``temperature`` (0: greedy), optionally restricted by ``top_k`` /
    ``top_p``; generation stops after ``max_new_tokens`` or at the model's end-of-text token.
    The result is right-padded, with labels -100 on the prompt (unless ``label_prompt``) and
    the padding, and a ``generated`` field ``(batch, seq)``, aligned with the targets: True
    where the target token is the model's own sample, which ``lm_ce`` does not train on.
    ``label_prompt: true`` keeps the prompt's own labels, for prompts cut out of plain text
    (``prompt_tokens`` on packed blocks), whose tokens are ground truth worth training on.
    """

    def __init__(
        self,
        max_new_tokens: Annotated[int, Field(ge=1)] = 64,
        temperature: Annotated[float, Field(ge=0.0)] = 1.0,
        top_k: Annotated[int, Field(ge=1)] | None = None,
        top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0,
        prompt_tokens: Annotated[int, Field(ge=1)] | None = None,
        label_prompt: bool = False,
    ) -> None:
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.top_k, self.top_p, self.prompt_tokens = top_k, top_p, prompt_tokens
        self.label_prompt = label_prompt

    def _prompt_lengths(self, batch: Batch, lengths: torch.Tensor) -> torch.Tensor:
        if "prompt_length" in batch.extras:
            prompt = batch.extras["prompt_length"].to(lengths.device).long().reshape(-1)
        elif self.prompt_tokens is not None:
            prompt = torch.full_like(lengths, self.prompt_tokens)
        else:
            raise ValueError("hf_generate needs each sample's prompt: a 'prompt_length' batch field "
                             "(prompt_completion data) or the prompt_tokens param")
        return torch.minimum(prompt, lengths).clamp_min(1)

    @staticmethod
    def _special_ids(model: nn.Module) -> tuple[int | None, int]:
        config = getattr(model, "generation_config", None) or getattr(getattr(model, "base", model), "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        pad = getattr(config, "pad_token_id", None)
        return eos, int(pad if pad is not None else (eos if eos is not None else 0))

    @torch.no_grad()
    def generate(self, model: nn.Module, batch: Batch) -> Batch:
        """``batch`` with every completion replaced by ``model``'s own (prompt kept, labels -100 on it)."""
        if not callable(getattr(model, "generate", None)):
            raise ValueError(f"hf_generate needs a model with a transformers generate method, got {type(model).__name__}")
        ids = batch.inputs
        mask = batch.extras.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        prompts = self._prompt_lengths(batch, mask.sum(dim=1).long())
        eos, pad = self._special_ids(model)
        width = int(prompts.max())
        left = torch.full((ids.shape[0], width), pad, dtype=ids.dtype, device=ids.device)
        left_mask = torch.zeros_like(left)
        for i, p in enumerate(prompts.tolist()):  # left-pad the prompts for generation
            left[i, width - p:] = ids[i, :p]
            left_mask[i, width - p:] = 1
        options: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "pad_token_id": pad, "eos_token_id": eos}
        if self.temperature > 0.0:
            options.update(do_sample=True, temperature=self.temperature, top_k=self.top_k or 0, top_p=self.top_p)
        else:
            options.update(do_sample=False)
        generated = model.generate(input_ids=left, attention_mask=left_mask, **options)[:, width:]
        keep = torch.ones_like(generated, dtype=torch.bool)
        if eos is not None:  # keep up to and including the first end-of-text token
            after_eos = (generated == eos).long().cumsum(dim=1) - (generated == eos).long()
            keep = after_eos == 0
        new_lengths = keep.sum(dim=1)
        total = int((prompts + new_lengths).max())
        out_ids = torch.full((ids.shape[0], total), pad, dtype=ids.dtype, device=ids.device)
        labels = torch.full_like(out_ids, IGNORE_INDEX)
        out_mask = torch.zeros_like(out_ids)
        sampled = torch.zeros_like(out_ids, dtype=torch.bool)
        for i, (p, n) in enumerate(zip(prompts.tolist(), new_lengths.tolist())):
            out_ids[i, :p] = ids[i, :p]
            out_ids[i, p:p + n] = generated[i, :n]
            labels[i, p:p + n] = generated[i, :n]
            if self.label_prompt:
                labels[i, :p] = ids[i, :p]
            out_mask[i, :p + n] = 1
            sampled[i, p:p + n] = True
        extras = {k: v for k, v in batch.extras.items() if k not in ("attention_mask", "prompt_length", "generated")}
        extras["generated"] = torch.zeros_like(sampled)
        extras["generated"][:, :-1] = sampled[:, 1:]  # aligned with the (shifted) targets
        return lm_batch(out_ids, labels, out_mask, index=batch.index, prompt_length=prompts, **extras)


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


@hookimpl
def register_students(register) -> None:
    """Register ``hf_causal_lm`` (unavailable without transformers)."""
    register("hf_causal_lm", _factory())


@hookimpl
def register_teachers(register) -> None:
    """Register ``hf_causal_lm`` (unavailable without transformers)."""
    register("hf_causal_lm", _factory())


@hookimpl
def register_generators(register) -> None:
    """Register ``hf_generate`` (unavailable without transformers)."""
    if _missing("transformers"):
        register("hf_generate", unavailable(f"hf_generate needs transformers: {INSTALL}",
                                            "Completions sampled with transformers' generate (needs transformers)."))
    else:
        register("hf_generate", HFGenerate)


def _factory() -> Any:
    if _missing("transformers"):
        return unavailable(f"hf_causal_lm needs transformers: {INSTALL}",
                           "A Hugging Face causal language model (needs transformers).")
    return hf_causal_lm
