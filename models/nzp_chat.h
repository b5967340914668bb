/* nzp chat: see nzp_chat.c. */
#ifndef NZP_CHAT_H
#define NZP_CHAT_H

/** Run `nzp chat` with the arguments after the command name.
 *  @return the process exit status: 0 every turn answered, 1 a turn or the
 *          model failed (messages on stderr), 2 usage error. */
int nzp_chat(int argc, char **argv);

#endif
