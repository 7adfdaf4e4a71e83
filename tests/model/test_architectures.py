import pytest
import torch

from megatron_normistral.model.architectures import ARCHITECTURES, UnknownArchitectureError, get_architecture
from megatron_normistral.model.provider import ModelConfig, ModelConfigError, PrecisionConfig, transformer_config, validate_layout
from megatron_normistral.model.specs import resolve_transformer_impl
from megatron_normistral.runtime.parallel import ParallelConfig, ParallelConfigError
from megatron_normistral.testing.distributed import run_distributed
from megatron_normistral.testing.model_probes import count_parameters


def test_nemo_shapes():
    nemo = get_architecture("mistral-nemo-12b")
    assert (nemo.num_layers, nemo.hidden_size, nemo.num_attention_heads, nemo.num_query_groups) == (40, 5120, 32, 8)
    assert (nemo.head_dim, nemo.ffn_hidden_size, nemo.vocab_size, nemo.rope_theta, nemo.norm_eps) == (128, 14336, 131072, 1e6, 1e-5)
    assert nemo.query_width == 4096 and nemo.untie_embeddings
    assert get_architecture("normistral-11b").vocab_size == 51200


def test_parameter_counts_of_the_real_models():
    # Paper: NorMistral-11b "about 11.4B"; Mistral-NeMo 12.2B. Computed, nothing allocated.
    assert get_architecture("normistral-11b").num_parameters() == pytest.approx(11.43e9, rel=2e-3)
    assert get_architecture("mistral-nemo-12b").num_parameters() == pytest.approx(12.25e9, rel=2e-3)


def test_training_flops_follow_the_6n_rule_plus_attention():
    arch = get_architecture("normistral-11b")
    flops = arch.training_flops_per_token(4096)
    six_n = 6 * (arch.num_parameters() - arch.vocab_size * arch.hidden_size)  # input embedding lookup is free
    attention = 12 * arch.num_layers * 4096 * arch.query_width
    assert flops == pytest.approx(six_n + attention, rel=1e-3)


@pytest.mark.parametrize(
    "parallel,world",
    [(ParallelConfig(), 1), (ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), 4)],
)
def test_analytic_count_equals_allocated_model(parallel, world):
    model = ModelConfig(arch="tiny", transformer_impl="local")
    assert run_distributed(count_parameters, world, args=(model, parallel)) == get_architecture("tiny").num_parameters()


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(UnknownArchitectureError, match="normistral-11b"):
        get_architecture("llama-7b")


def test_vocab_override():
    assert ModelConfig(arch="mistral-nemo-12b", vocab_size=51200).architecture().num_parameters() == ARCHITECTURES["normistral-11b"].num_parameters()


@pytest.mark.parametrize(
    "parallel,message",
    [
        (ParallelConfig(tensor_model_parallel_size=3), r"attention heads \(4\) not divisible by tensor parallel size \(3\)"),
        (ParallelConfig(pipeline_model_parallel_size=3), r"layers \(4\) not divisible by pipeline size x virtual stages \(3 x 1 = 3\)"),
        (ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=4), r"\(2 x 4 = 8\)"),
    ],
)
def test_layout_errors_name_the_numbers(parallel, message):
    with pytest.raises(ModelConfigError, match=message):
        validate_layout(get_architecture("tiny"), parallel)


def test_parallel_config_errors():
    with pytest.raises(ParallelConfigError, match="world size 6 is not divisible by tensor x pipeline = 2 x 2 = 4"):
        ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).validate(6)
    with pytest.raises(ParallelConfigError, match="sequence parallelism needs tensor parallel size > 1"):
        ParallelConfig(sequence_parallel=True).validate()
    assert ParallelConfig(tensor_model_parallel_size=2).data_parallel_size(8) == 4


def test_fp8_needs_transformer_engine():
    if resolve_transformer_impl("auto") == "transformer_engine":
        pytest.skip("Transformer Engine is importable here; this checks the refusal without it")
    with pytest.raises(ModelConfigError, match="needs Transformer Engine"):
        transformer_config(ModelConfig(arch="tiny"), ParallelConfig(), PrecisionConfig(bf16=True, fp8_format="hybrid"))


def test_interleaving_turns_batched_p2p_off():
    pp2 = ParallelConfig(pipeline_model_parallel_size=2)
    assert transformer_config(ModelConfig(arch="tiny"), pp2, PrecisionConfig()).batch_p2p_comm is True
    vpp = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    assert transformer_config(ModelConfig(arch="tiny"), vpp, PrecisionConfig()).batch_p2p_comm is False


def test_bf16_config():
    config = transformer_config(ModelConfig(arch="tiny"), ParallelConfig(), PrecisionConfig(bf16=True))
    assert config.bf16 and config.params_dtype == torch.bfloat16 and config.kv_channels == 32
