"""Script for tests/test_integrations_trl_vision.py (`torchrun --nproc_per_node 2 tests/trl_vision_dist.py
CHECKPOINT OUT_DIR`): one CEPOTrainer step of a tiny Qwen3-VL policy under FSDP2 (gloo, CPU), with fixed
completions such that rank 0's rows have teacher passes and rank 1's have none (its group's completions are
equal, so its advantages are 0): rank 1 then runs the one-token passes that keep it in step with rank 0's
teacher forwards (FSDP2 gathers each layer collectively). Each rank writes its teachers' log-probs, the
plain forward's (float32 and float64, the initial weights, one row at a time) and whether every parameter
was a DTensor."""

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trl_helpers import force_fsdp2_on_cpu, tiny_config  # noqa: E402


def main(checkpoint: str, out_dir: str):
    from test_integrations_trl_vision import (
        COMPLETIONS,
        Captured,
        digit_reward,
        plain,
        row_inputs,
        vl_dataset,
    )
    from torch.distributed.tensor import DTensor

    from cepo_kernels.integrations.trl import CEPOConfig
    from cepo_kernels.rl.vision_model import load_processor, load_vision_model

    force_fsdp2_on_cpu(["Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"])
    model = load_vision_model(checkpoint)
    initial = copy.deepcopy(model).eval()

    class OneSided(Captured):  # rank 1: both completions of its group equal (A = 0, no teacher row)
        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            rank = self.accelerator.process_index
            texts = [COMPLETIONS[0] if rank else COMPLETIONS[2 + i % 2] for i in range(len(prompt_ids))]
            return [self._tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], None

    args = tiny_config(CEPOConfig, os.path.join(out_dir, "trainer"), per_device_train_batch_size=2,
                       num_generations=2, max_steps=1, learning_rate=0.1, teacher_batch_size=1,
                       ddp_timeout=60)
    tr = OneSided(model=model, reward_funcs=digit_reward, args=args, train_dataset=vl_dataset(n=2),
                  processing_class=load_processor(checkpoint))
    tr.train()
    rank = tr.accelerator.process_index
    (record, tensors), output = tr.seen[0], tr.outputs[0]
    params = tr.accelerator.unwrap_model(tr.model).parameters()
    result = {"world_size": tr.accelerator.num_processes, "rows": list(tensors["rows"]),
              "teacher_rows": record["teacher_rows"], "teacher_forwards": record["teacher_forwards"],
              "dtensors": all(isinstance(p, DTensor) for p in params),
              "got": [], "p32": [], "p64": []}
    m64 = copy.deepcopy(initial).double()
    G, tok, B = tr.num_generations, tr._tokenizer, len(output["prompt_ids"])
    image_ids = (tr._image_pad_token_id, tr._video_pad_token_id)
    for i in tensors["rows"]:
        neg = record["neg_answers"][(rank * B + i) // G]  # r- of the row's group in the gathered batch
        for side, answer in (("pos_logp", tr.answers[0][i]), ("neg_logp", neg)):
            inputs, completion = row_inputs(output, i, answer, tok, image_ids=image_ids)
            n = len(completion)
            result["got"].append(tensors[side][i, :n].tolist())
            result["p32"].append(plain(initial, inputs, n, torch.float32).tolist())
            result["p64"].append(plain(m64, inputs, n, torch.float64).tolist())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
