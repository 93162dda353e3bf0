cepo_advantages = cepo_loss = grpo_loss = token_logprobs = None
