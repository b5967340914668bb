/* nzp translate: see nzp_translate.c. */
#ifndef NZP_TRANSLATE_H
#define NZP_TRANSLATE_H

/** Run `nzp translate` with the arguments after the command name.
 *  @return the process exit status: 0 every line translated, 1 a line or
 *          the model failed (messages on stderr), 2 usage error. */
int nzp_translate(int argc, char **argv);

#endif
