/* Hugging Face GPT-2 <-> Quasar checkpoints. Quasar's tensor names and [in, out] matrix
 * layout already follow transformers' GPT2 (Conv1D), so conversion maps the config,
 * strips the "transformer." prefix and widens F16/BF16 to F32. */
#ifndef QUASAR_CONVERT_H
#define QUASAR_CONVERT_H

/* Reads hf_dir/{config.json, model.safetensors} of a GPT2LMHeadModel and writes the
 * checkpoint out_run/ckpt/step_00000000 (plus out_run/config.json) with zero optimizer
 * moments, data.tokenizer "gpt2" and data.vocab_dir = vocab_dir. out_run must not
 * already hold a checkpoint. */
int qs_convert_from_hf(const char *hf_dir, const char *out_run, const char *vocab_dir);
/* Writes out_dir/{config.json, model.safetensors} (F32) that transformers'
 * GPT2LMHeadModel.from_pretrained loads, from a dense checkpoint (any folder
 * qs_checkpoint_find accepts). */
int qs_convert_to_hf(const char *ckpt_dir, const char *out_dir);

#endif
