/* GPT-2's byte-level BPE tokenizer, read from encoder.json + vocab.bpe. Encoding
 * matches GPT-2 (and tiktoken's "gpt2" with allowed_special="all"): the text is split
 * at each literal "<|endoftext|>" (which becomes its own id), each part is cut into
 * pre-tokens by GPT-2's regular expression, and each pre-token's bytes are merged by
 * rank. Decoding gives back the exact bytes. */
#ifndef QUASAR_TOKENIZER_H
#define QUASAR_TOKENIZER_H

#include <stddef.h>

typedef struct qs_tokenizer qs_tokenizer;

/* Loads DIR/encoder.json and DIR/vocab.bpe. Malformed files are errors naming the
 * file and the problem. */
int qs_tokenizer_load(qs_tokenizer **t, const char *dir);
void qs_tokenizer_free(qs_tokenizer *t);

int qs_tokenizer_vocab_size(const qs_tokenizer *t);
/* The id of "<|endoftext|>". */
int qs_tokenizer_eot(const qs_tokenizer *t);

/* Encodes text[0, n), which must be valid UTF-8 (else the error gives the byte offset),
 * into ids, which must have room for n ids (no token is shorter than a byte). Uses
 * scratch memory inside t: one thread per tokenizer. */
int qs_tokenizer_encode(qs_tokenizer *t, const char *text, size_t n, int *ids, size_t *n_ids);

/* Decodes ids into a malloc'd buffer *text of *n bytes (NUL-terminated, not counted).
 * An id outside [0, vocab size) is an error naming it and its position. */
int qs_tokenizer_decode(const qs_tokenizer *t, const int *ids, size_t n_ids, char **text, size_t *n);

/* Learns a byte-level BPE vocabulary of vocab_size tokens (257..65536) from UTF-8
 * text[0, n), cutting the text exactly as qs_tokenizer_encode does, and writes
 * out_dir/encoder.json and out_dir/vocab.bpe in GPT-2's format (atomically; the folder
 * is made if missing). Ids 0..255 are the bytes in GPT-2's order, then one token per
 * merge, most frequent pair first (ties: the merge whose bytes sort first), and
 * <|endoftext|> last. The same text and size always give the same files. */
int qs_bpe_train(const char *text, size_t n, int vocab_size, const char *out_dir);

/* `quasar tokenize` / `detokenize` / `shard` / `bpe-train` (argv after the command
 * name): exit codes. */
int qs_cli_tokenize(int argc, char **argv);
int qs_cli_detokenize(int argc, char **argv);
int qs_cli_shard(int argc, char **argv);
int qs_cli_bpe_train(int argc, char **argv);

#endif
