/* state.json parsing. The input is passed as is, without a terminating NUL, as
 * qs_state_parse allows, so any read past its end is caught. */
#include "fuzz.h"

#include "quasar/checkpoint.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    qs_train_state st;
    if (qs_state_parse((const char *)data, size, &st, "state.json") == 0)
        FUZZ_CHECK(st.step >= 0 && st.tokens_seen >= 0 && st.seed <= (UINT64_C(1) << 53));
    return 0;
}
