/* GPT-2's text rules, shared by the encoder (tokenizer.c) and the BPE trainer
 * (bpe_train.c) so that training sees text cut exactly as encoding will cut it
 * (internal to csrc/). */
#ifndef QUASAR_PRETOKENIZE_H
#define QUASAR_PRETOKENIZE_H

#include <stddef.h>

#define QS_EOT_TEXT "<|endoftext|>"
#define QS_EOT_LEN (sizeof QS_EOT_TEXT - 1)

typedef struct qs_pretokenizer qs_pretokenizer;

int qs_pretokenizer_new(qs_pretokenizer **p);
void qs_pretokenizer_free(qs_pretokenizer *p);

/* Called for each piece in text order: a pre-token, or (is_eot) a literal
 * <|endoftext|>. A nonzero return stops qs_pretokenize, which returns it. */
typedef int (*qs_piece_fn)(void *ctx, const char *s, size_t n, int is_eot);

/* Checks that text[0, n) is valid UTF-8 (else the error gives the byte offset), splits it
 * at each literal <|endoftext|> and cuts the parts into pre-tokens by GPT-2's regular
 * expression. Uses match memory inside p: one thread per pretokenizer. */
int qs_pretokenize(qs_pretokenizer *p, const char *text, size_t n, qs_piece_fn piece, void *ctx);

/* GPT-2's files write each byte as one printable code point below QS_ALPHABET_CPS;
 * byte_of_cp maps those code points back to bytes (-1 for the unused ones). */
#define QS_ALPHABET_CPS (256 + 68)
void qs_byte_alphabet(int byte_of_cp[QS_ALPHABET_CPS]);

#endif
