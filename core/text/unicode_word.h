/* unicode_word.h — word characters as `tokenizers` sees them for single_word added tokens. */
#ifndef MT_CORE_UNICODE_WORD_H
#define MT_CORE_UNICODE_WORD_H

#include <stdint.h>

/* 1 when the code point is a word character (Rust regex's Unicode \w), else 0. */
int mt_unicode_is_word(uint32_t cp);

#endif
