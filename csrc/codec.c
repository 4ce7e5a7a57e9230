#include "quasar/codec.h"

#include <stdlib.h>
#include <string.h>

#include "quasar/error.h"

int qs_codec_open(qs_codec *c, const qs_data_config *dc, const char *chars_json) {
    memset(c, 0, sizeof *c);
    if (!strcmp(dc->tokenizer, "gpt2")) return qs_tokenizer_load(&c->bpe, dc->vocab_dir);
    return chars_json ? qs_vocab_from_json(&c->chars, chars_json) : 0;
}

void qs_codec_free(qs_codec *c) {
    qs_tokenizer_free(c->bpe);
    c->bpe = NULL;
}

int qs_codec_vocab_size(const qs_codec *c) { return c->bpe ? qs_tokenizer_vocab_size(c->bpe) : c->chars.size; }

int qs_codec_encode(qs_codec *c, const char *text, size_t n, int *ids, size_t *n_ids) {
    if (c->bpe) return qs_tokenizer_encode(c->bpe, text, n, ids, n_ids);
    *n_ids = n;
    return qs_vocab_encode(&c->chars, (const unsigned char *)text, n, ids);
}

int qs_codec_put(const qs_codec *c, int id, FILE *out) {
    if (!c->bpe) return fputc(c->chars.bytes[id], out) == EOF ? qs_error("cannot write output") : 0;
    char *text;
    size_t n;
    if (qs_tokenizer_decode(c->bpe, &id, 1, &text, &n)) return -1;
    int rc = fwrite(text, 1, n, out) == n ? 0 : qs_error("cannot write output");
    free(text);
    return rc;
}

int qs_codec_start_token(const qs_codec *c) {
    if (c->bpe) return qs_tokenizer_eot(c->bpe);
    return c->chars.id['\n'] >= 0 ? c->chars.id['\n'] : 0;
}
