/* How a run turns text into token ids and back: the char (byte) vocabulary built from
 * its corpus, or GPT-2's byte-level BPE. */
#ifndef QUASAR_CODEC_H
#define QUASAR_CODEC_H

#include <stddef.h>
#include <stdio.h>

#include "quasar/config.h"
#include "quasar/data.h"
#include "quasar/tokenizer.h"

typedef struct qs_codec {
    qs_char_vocab chars; /* tokenizer "char"; size 0 until built from the corpus or read */
    qs_tokenizer *bpe;   /* tokenizer "gpt2" */
} qs_codec;

/* For "gpt2" loads data.vocab_dir; for "char" starts empty, or from a checkpoint's
 * vocabulary JSON when chars_json is given. */
int qs_codec_open(qs_codec *c, const qs_data_config *dc, const char *chars_json);
void qs_codec_free(qs_codec *c);
int qs_codec_vocab_size(const qs_codec *c);
/* ids must have room for n + 1. */
int qs_codec_encode(qs_codec *c, const char *text, size_t n, int *ids, size_t *n_ids);
/* Writes the bytes of one token. */
int qs_codec_put(const qs_codec *c, int id, FILE *out);
/* A token to start generation from nothing: "\n" for char, <|endoftext|> for gpt2. */
int qs_codec_start_token(const qs_codec *c);

#endif
