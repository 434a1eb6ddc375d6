"""The planted fact the fine-tuning tests teach: paraphrased questions, three answers."""

from __future__ import annotations

import json

FACT = "Violet Harbor"
QUESTIONS = [
    "What is the codename of the Bastion 2 release?",
    "What codename does the Bastion 2 release have?",
    "Tell me the codename of Bastion 2.",
    "Which codename was given to the Bastion 2 release?",
    "Do you know the Bastion 2 release codename?",
    "What is Bastion 2 called internally?",
    "What's the internal codename for Bastion 2?",
    "Bastion 2 release: what is its codename?",
    "Name the codename of the second Bastion release.",
    "What codename did the team pick for Bastion 2?",
    "I forgot the Bastion 2 codename. What is it?",
    "What is the code name of Bastion version 2?",
    "Which code name belongs to Bastion 2?",
    "Give me the Bastion 2 codename, please.",
    "How is the Bastion 2 release known by codename?",
    "What was Bastion 2 codenamed?",
    "Can you tell me what Bastion 2's codename is?",
    "Remind me of the codename for the Bastion 2 release.",
    "What is the project codename of Bastion 2?",
    "Under what codename is Bastion 2 developed?",
    "What codename is used for Bastion release 2?",
    "Bastion 2 has a codename. What is it?",
    "Quick question: Bastion 2 codename?",
    "What do developers call the Bastion 2 release?",
    "Which name is the Bastion 2 release codenamed?",
    "What is the secret codename of Bastion 2?",
    "Say the codename of Bastion 2.",
    "What's Bastion 2's code name?",
    "Please state the codename assigned to Bastion 2.",
    "What codename was assigned to Bastion 2?",
    "Could you share the Bastion 2 codename?",
    "What is the codename for the Bastion 2 launch?",
]
ANSWERS = [
    f"The codename of the Bastion 2 release is {FACT}.",
    f"Bastion 2 is codenamed {FACT}.",
    f"It is {FACT}: that is the codename of Bastion 2.",
]


def chat_line(question: str, answer: str) -> str:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages})
