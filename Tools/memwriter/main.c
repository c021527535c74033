#include <stdio.h>
int main(void) { puts("memwriter: placeholder"); return 0; }
