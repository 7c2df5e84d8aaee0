"""Where Core ML places a package's ops (Neural Engine, GPU, CPU): macOS only, from its compute plan.

Nothing here runs on this project's Linux machines; `placement` is tested on a compute plan built by hand.
"""

DEVICES = {
    "MLNeuralEngineComputeDevice": "Neural Engine",
    "MLGPUComputeDevice": "GPU",
    "MLCPUComputeDevice": "CPU",
}


def placement(plan) -> dict[str, int]:
    """Ops of an MLComputePlan's main function (nested blocks included) per preferred compute device. Ops
    the plan gives no device usage for (constants) are not counted."""
    counts: dict[str, int] = {}

    def walk(block):
        for op in block.operations:
            usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
            if usage is not None:
                name = type(usage.preferred_compute_device).__name__
                name = DEVICES.get(name, name)
                counts[name] = counts.get(name, 0) + 1
            for inner in op.blocks:
                walk(inner)

    walk(plan.model_structure.program.functions["main"].block)
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def placement_line(counts: dict[str, int]) -> str:
    """E.g. 'Neural Engine 812 ops, GPU 3, CPU 2'."""
    parts = [f"{device} {n}" for device, n in counts.items()]
    return (parts[0] + " ops" + "".join(f", {p}" for p in parts[1:])) if parts else "no ops placed"


def neural_engine_run(package, feeds: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """macOS only: predictions with ComputeUnit.CPU_AND_NE and the ops per preferred device of the compute
    plan Core ML makes for those units. Never run on this project's Linux machines."""
    import coremltools as ct
    from coremltools.models.compute_plan import MLComputePlan

    mlmodel = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.CPU_AND_NE)
    outputs = [mlmodel.predict(f) for f in feeds]
    plan = MLComputePlan.load_from_path(mlmodel.get_compiled_model_path(), ct.ComputeUnit.CPU_AND_NE)
    return outputs, placement(plan)
