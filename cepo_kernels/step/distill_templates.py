"""The teacher templates of the distillation relatives (OPSD, SDPO) and their teacher weights.

OPSD (arXiv 2601.18734): the problem, then the reference solution introduced as "Here is a reference
solution to this problem:", then an instruction to solve it with its own reasoning (the wording here is
this package's, in that style). SDPO (arXiv 2601.20802): the user text, "\\nCorrect solution:\\n\\n" + a
successful rollout of the same group + "\\n\\n", then "\\n\\nCorrectly solve the original question.\\n".
Both are user messages ({question}, {answer}) that go through the chat template again.
"""

OPSD_TEMPLATE = ("{question}\n\nHere is a reference solution to this problem:\n{answer}\n\n"
                 "After understanding the reference solution, solve the problem with your own reasoning.")
SDPO_TEMPLATE = "{question}\nCorrect solution:\n\n{answer}\n\n\n\nCorrectly solve the original question.\n"
# the current weights (no gradient), the initial ones (LoRA disabled, else a frozen copy), an EMA copy
DISTILL_TEACHERS = ("live", "initial", "ema")
