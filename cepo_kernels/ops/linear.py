linear_cepo_loss = linear_grpo_loss = linear_logprobs = linear_teacher_logprobs = None
