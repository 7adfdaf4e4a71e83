"""Looking at runs, data and models from outside the training loop; the tools in ``tools/`` are
thin CLIs over these modules.

    from megatron_normistral.reporting.run_plots import plot_runs, read_run_log      # tools/plot_run.py
    from megatron_normistral.reporting.data_inspection import step_samples           # tools/inspect_data.py
    from megatron_normistral.reporting.model_evaluation import evaluate_models       # tools/evaluate_model.py
    from megatron_normistral.reporting.run_plan import plan_run, format_plan         # tools/plan_run.py
"""
