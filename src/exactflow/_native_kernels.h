/* The compiled passes in one precision.
 *
 * _native.c includes this file twice: with REAL float, VL 8 and SUFFIX _f32, then with REAL
 * double, VL 4 and SUFFIX _f64. VEC is a vector of VL reals, 32 bytes, which GCC maps to the
 * widest registers of each target of CLONES.
 *
 * Notation: n rows, d coordinates, h hidden units. Rows are stored row-major: x[i * d + c].
 * A coupling keeps the coordinates c with c % 2 == parity (nk of them) and transforms the others
 * (nf of them); net 0 is the scale net, net 1 the shift net.
 */

#define FN(name) CAT(name, SUFFIX)
#define NR (2 * VL)

typedef REAL FN(vec) __attribute__((vector_size(32)));
typedef INTEGER FN(mask) __attribute__((vector_size(32)));
#define VEC FN(vec)
#define MASK FN(mask)

static inline __attribute__((always_inline)) VEC FN(load)(const REAL *p)
{
    VEC v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Lane by lane: where keep, value; elsewhere value * slope. */
static inline __attribute__((always_inline)) VEC FN(leaky)(VEC value, MASK keep, REAL slope)
{
    return (VEC)(((MASK)value & keep) | ((MASK)(value * slope) & ~keep));
}

/* The sum of a[k] * b[k]: VL partial sums, then the lanes in order, then the tail. */
static inline __attribute__((always_inline)) REAL FN(dot)(const REAL *a, const REAL *b, int64_t n)
{
    VEC acc0 = {0}, acc1 = {0};
    int64_t k = 0;
    for (; k + NR <= n; k += NR) {
        acc0 += FN(load)(a + k) * FN(load)(b + k);
        acc1 += FN(load)(a + k + VL) * FN(load)(b + k + VL);
    }
    for (; k + VL <= n; k += VL)
        acc0 += FN(load)(a + k) * FN(load)(b + k);
    acc0 += acc1;
    REAL sum = 0;
    for (int l = 0; l < VL; l++)
        sum += acc0[l];
    for (; k < n; k++)
        sum += a[k] * b[k];
    return sum;
}

/* One tile of C = epilogue(A B): mr rows (at most MR) by NR columns, the whole of K. */
static inline __attribute__((always_inline)) void FN(tile)(
    int mode, int mr, int64_t K, const REAL *A, int64_t ars, int64_t aks, const REAL *B,
    int64_t ldb, REAL *C, int64_t ldc, const REAL *bias, REAL slope, const REAL *gate)
{
    VEC acc[MR][2];
    for (int r = 0; r < mr; r++)
        acc[r][0] = acc[r][1] = (VEC){0};
    for (int64_t k = 0; k < K; k++) {
        VEC b0 = FN(load)(B + k * ldb), b1 = FN(load)(B + k * ldb + VL);
        for (int r = 0; r < mr; r++) {
            REAL a = A[r * ars + k * aks];
            acc[r][0] += a * b0;
            acc[r][1] += a * b1;
        }
    }

    for (int r = 0; r < mr; r++) {
        for (int half = 0; half < 2; half++) {
            VEC v = acc[r][half];
            if (mode == BIAS_LEAKY) {
                v += FN(load)(bias + half * VL);
                v = FN(leaky)(v, v > 0, slope);
            } else if (mode == LEAKY_GRAD) {
                v = FN(leaky)(v, FN(load)(gate + r * ldc + half * VL) > 0, slope);
            }
            memcpy(C + r * ldc + half * VL, &v, sizeof v);
        }
    }
}

static inline __attribute__((always_inline)) void FN(tiles)(
    int mode, int mr, int64_t K, const REAL *A, int64_t ars, int64_t aks, const REAL *B,
    int64_t ldb, REAL *C, int64_t ldc, const REAL *bias, REAL slope, const REAL *gate)
{
    switch (mr) {
    case 6: FN(tile)(mode, 6, K, A, ars, aks, B, ldb, C, ldc, bias, slope, gate); break;
    case 5: FN(tile)(mode, 5, K, A, ars, aks, B, ldb, C, ldc, bias, slope, gate); break;
    case 4: FN(tile)(mode, 4, K, A, ars, aks, B, ldb, C, ldc, bias, slope, gate); break;
    case 3: FN(tile)(mode, 3, K, A, ars, aks, B, ldb, C, ldc, bias, slope, gate); break;
    case 2: FN(tile)(mode, 2, K, A, ars, aks, B, ldb, C, ldc, bias, slope, gate); break;
    default: FN(tile)(mode, 1, K, A, ars, aks, B, ldb, C, ldc, bias, slope, gate); break;
    }
}

/* C (M × N, row stride ldc) = epilogue(A B), A read as A[i * ars + k * aks], B row-major.
 *
 * PLAIN stores the product; BIAS_LEAKY adds bias[j] and applies the leaky ReLU; LEAKY_GRAD
 * multiplies by the leaky ReLU's derivative read off gate, laid out like C.
 */
CLONES static void FN(gemm)(
    int mode, int64_t M, int64_t N, int64_t K, const REAL *A, int64_t ars, int64_t aks,
    const REAL *B, int64_t ldb, REAL *C, int64_t ldc, const REAL *bias, REAL slope,
    const REAL *gate)
{
    int64_t N0 = N - N % NR;
    for (int64_t j = 0; j < N0; j += NR) {
        for (int64_t i = 0; i < M; i += MR) {
            int mr = M - i < MR ? (int)(M - i) : MR;
            const REAL *a = A + i * ars;
            REAL *c = C + i * ldc + j;
            const REAL *g = gate ? gate + i * ldc + j : NULL;
            const REAL *bj = bias ? bias + j : NULL;
            if (mode == PLAIN)
                FN(tiles)(PLAIN, mr, K, a, ars, aks, B + j, ldb, c, ldc, bj, slope, g);
            else if (mode == BIAS_LEAKY)
                FN(tiles)(BIAS_LEAKY, mr, K, a, ars, aks, B + j, ldb, c, ldc, bj, slope, g);
            else
                FN(tiles)(LEAKY_GRAD, mr, K, a, ars, aks, B + j, ldb, c, ldc, bj, slope, g);
        }
    }

    /* The columns past the last whole tile, one at a time. */
    for (int64_t i = 0; i < M; i++) {
        for (int64_t j = N0; j < N; j++) {
            REAL sum = 0;
            for (int64_t k = 0; k < K; k++)
                sum += A[i * ars + k * aks] * B[k * ldb + j];
            if (mode == BIAS_LEAKY) {
                sum += bias[j];
                sum = sum > 0 ? sum : sum * slope;
            } else if (mode == LEAKY_GRAD) {
                sum = gate[i * ldc + j] > 0 ? sum : sum * slope;
            }
            C[i * ldc + j] = sum;
        }
    }
}

/* out (cols × rows) = the transpose of in (rows × cols, row stride ld). */
static void FN(transpose)(const REAL *in, int64_t rows, int64_t cols, int64_t ld, REAL *out)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++)
            out[c * rows + r] = in[r * ld + c];
}

/* What the passes keep of one segment: its input rows and, per kind, what backward reads. */
typedef struct {
    REAL *x;
    REAL *h1[2], *h2[2];  /* coupling: hidden activations, n × h per net */
    REAL *s, *e;          /* coupling: tanh of the scale net's output and its exp, n × nf */
    REAL *w1k[2];         /* coupling: the first layer's kept columns, nk × h per net */
    REAL *w2t[2];         /* coupling: the second layer transposed, h × h per net */
    REAL *mean, *inv_std; /* batch norm: the statistics the map used, d each */
    REAL *tanh_a;         /* planar: tanh(w^T x + b), n */
    REAL *u_hat;          /* planar: the constrained u, d */
    REAL c, wu, ww, coef; /* planar: w^T u_hat, w^T u, w^T w, (softplus(wu) - 1 - wu) / ww */
} FN(Saved);

#define Saved FN(Saved)

static REAL *FN(take)(Arena *arena, int64_t count)
{
    return (REAL *)arena_take(arena, count * (int64_t)sizeof(REAL));
}

/* Reserve what a segment keeps for n rows and prepare its weights in their read layouts. */
static void FN(prepare)(const Record *rec, Saved *sv, int64_t n, Arena *arena)
{
    int64_t d = rec->dim, h = rec->hidden;
    memset(sv, 0, sizeof *sv);
    if (rec->op == OP_COUPLING) {
        int64_t nk = (d - rec->parity + 1) / 2, nf = d - nk;
        for (int net = 0; net < 2; net++) {
            sv->w1k[net] = FN(take)(arena, nk * h);
            sv->w2t[net] = FN(take)(arena, h * h);
            sv->h1[net] = FN(take)(arena, n * h);
            sv->h2[net] = FN(take)(arena, n * h);
            if (!arena->base)
                continue;
            const REAL *w1 = (const REAL *)rec->value[net * 6 + 0];
            const REAL *w2 = (const REAL *)rec->value[net * 6 + 2];
            for (int64_t kk = 0; kk < nk; kk++)
                for (int64_t o = 0; o < h; o++)
                    sv->w1k[net][kk * h + o] = w1[o * d + rec->parity + 2 * kk];
            FN(transpose)(w2, h, h, h, sv->w2t[net]);
        }
        sv->s = FN(take)(arena, n * nf);
        sv->e = FN(take)(arena, n * nf);
    } else if (rec->op == OP_BATCHNORM) {
        sv->mean = FN(take)(arena, d);
        sv->inv_std = FN(take)(arena, d);
    } else {
        sv->u_hat = FN(take)(arena, d);
        sv->tanh_a = FN(take)(arena, n);
        if (!arena->base)
            return;
        const REAL *w = (const REAL *)rec->value[0], *u = (const REAL *)rec->value[1];
        REAL wu = 0, ww = 0;
        for (int64_t c = 0; c < d; c++) {
            wu += w[c] * u[c];
            ww += w[c] * w[c];
        }
        /* softplus as torch computes it: the identity above 20. */
        REAL softplus = wu > 20 ? wu : R_LOG1P(R_EXP(wu));
        REAL coef = (softplus - 1 - wu) / ww;
        REAL c_ = 0;
        for (int64_t c = 0; c < d; c++) {
            sv->u_hat[c] = u[c] + coef * w[c];
            c_ += w[c] * sv->u_hat[c];
        }
        sv->c = c_;
        sv->wu = wu;
        sv->ww = ww;
        sv->coef = coef;
    }
}

/* y = coupling(x) for n rows; adds each row's log-det to log_det. */
CLONES static void FN(coupling_forward)(
    const Record *rec, const double *k, Saved *sv, const REAL *x, REAL *y, REAL *log_det,
    int64_t n)
{
    int64_t d = rec->dim, h = rec->hidden, parity = rec->parity;
    int64_t nk = (d - parity + 1) / 2, nf = d - nk;
    REAL slope = (REAL)k[0];
    REAL out[2];

    for (int net = 0; net < 2; net++) {
        const REAL *b1 = (const REAL *)rec->value[net * 6 + 1];
        REAL *h1 = sv->h1[net];
        for (int64_t i = 0; i < n; i++) {
            REAL *row = h1 + i * h;
            for (int64_t o = 0; o < h; o++)
                row[o] = b1[o];
            for (int64_t kk = 0; kk < nk; kk++) {
                REAL xi = x[i * d + parity + 2 * kk];
                const REAL *w = sv->w1k[net] + kk * h;
                for (int64_t o = 0; o < h; o++)
                    row[o] += xi * w[o];
            }
            for (int64_t o = 0; o < h; o++)
                row[o] = row[o] > 0 ? row[o] : row[o] * slope;
        }
        const REAL *b2 = (const REAL *)rec->value[net * 6 + 3];
        FN(gemm)(BIAS_LEAKY, n, h, h, h1, h, 1, sv->w2t[net], h, sv->h2[net], h, b2, slope, NULL);
    }

    const REAL *w3s = (const REAL *)rec->value[4], *b3s = (const REAL *)rec->value[5];
    const REAL *w3t = (const REAL *)rec->value[10], *b3t = (const REAL *)rec->value[11];
    for (int64_t i = 0; i < n; i++) {
        const REAL *xi = x + i * d;
        REAL *yi = y + i * d;
        REAL sum = 0;
        for (int64_t c = parity; c < d; c += 2)
            yi[c] = xi[c];
        for (int64_t jj = 0; jj < nf; jj++) {
            int64_t j = 1 - parity + 2 * jj;
            out[0] = b3s[j] + FN(dot)(sv->h2[0] + i * h, w3s + j * h, h);
            out[1] = b3t[j] + FN(dot)(sv->h2[1] + i * h, w3t + j * h, h);
            REAL s = R_TANH(out[0]);
            REAL e = R_EXP(s);
            yi[j] = xi[j] * e + out[1];
            sv->s[i * nf + jj] = s;
            sv->e[i * nf + jj] = e;
            sum += s;
        }
        log_det[i] += sum;
    }
}

/* Scratch of the backward passes, sized for the widest segment. */
typedef struct {
    REAL *g_out; /* coupling: gradients in both nets' outputs, 2 × n × nf */
    REAL *g_a2;  /* coupling: gradient in the second layer's pre-activation, n × h */
    REAL *g_a1;  /* coupling: gradient in the first layer's pre-activation, n × h */
    REAL *g_w1k; /* coupling: gradient in the first layer's kept columns, nk × h */
} FN(Scratch);

#define Scratch FN(Scratch)

static void FN(reserve_scratch)(
    const Record *program, int64_t segments, int64_t n, Scratch *scratch, Arena *arena)
{
    int64_t d = program[0].dim, h = 0;
    for (int64_t s = 0; s < segments; s++)
        if (program[s].op == OP_COUPLING && program[s].hidden > h)
            h = program[s].hidden;
    scratch->g_out = FN(take)(arena, 2 * n * d);
    scratch->g_a2 = FN(take)(arena, n * h);
    scratch->g_a1 = FN(take)(arena, n * h);
    scratch->g_w1k = FN(take)(arena, d * h);
}

/* Given g_y, the gradient of the loss in y, and g_ld, its derivative in every row's log-det:
 * write the parameter gradients and g_x, the gradient in x (g_x may not alias g_y). */
CLONES static void FN(coupling_backward)(
    const Record *rec, const double *k, const Saved *sv, const REAL *g_y, REAL g_ld, REAL *g_x,
    int64_t n, const Scratch *scratch)
{
    int64_t d = rec->dim, h = rec->hidden, parity = rec->parity;
    int64_t nk = (d - parity + 1) / 2, nf = d - nk;
    REAL slope = (REAL)k[0];
    const REAL *x = sv->x;
    REAL *g_out = scratch->g_out, *g_a2 = scratch->g_a2, *g_a1 = scratch->g_a1;
    REAL *g_w1k = scratch->g_w1k;

    /* The output layer: y_j = x_j e^s + t, log-det sum of s, s = tanh(out_s), t = out_t. */
    for (int64_t i = 0; i < n; i++) {
        for (int64_t c = parity; c < d; c += 2)
            g_x[i * d + c] = g_y[i * d + c];
        for (int64_t jj = 0; jj < nf; jj++) {
            int64_t j = 1 - parity + 2 * jj;
            REAL s = sv->s[i * nf + jj], gy = g_y[i * d + j];
            REAL g_xj = gy * sv->e[i * nf + jj];
            REAL g_s = g_xj * x[i * d + j] + g_ld;
            g_out[i * nf + jj] = g_s * (1 - s * s);
            g_out[n * nf + i * nf + jj] = gy;
            g_x[i * d + j] = g_xj;
        }
    }

    for (int net = 0; net < 2; net++) {
        const REAL *go = g_out + net * n * nf;
        const REAL *w2 = (const REAL *)rec->value[net * 6 + 2];
        const REAL *w3 = (const REAL *)rec->value[net * 6 + 4];
        REAL *gw1 = (REAL *)rec->grad[net * 6 + 0], *gb1 = (REAL *)rec->grad[net * 6 + 1];
        REAL *gw2 = (REAL *)rec->grad[net * 6 + 2], *gb2 = (REAL *)rec->grad[net * 6 + 3];
        REAL *gw3 = (REAL *)rec->grad[net * 6 + 4], *gb3 = (REAL *)rec->grad[net * 6 + 5];
        const REAL *h1 = sv->h1[net], *h2 = sv->h2[net];

        /* Last layer: only the free rows of W3 and b3 reach the output. */
        memset(gw3, 0, (size_t)(d * h) * sizeof(REAL));
        memset(gb3, 0, (size_t)d * sizeof(REAL));
        for (int64_t jj = 0; jj < nf; jj++) {
            int64_t j = 1 - parity + 2 * jj;
            REAL *row = gw3 + j * h;
            REAL bias = 0;
            for (int64_t i = 0; i < n; i++) {
                REAL g = go[i * nf + jj];
                const REAL *hi = h2 + i * h;
                for (int64_t o = 0; o < h; o++)
                    row[o] += g * hi[o];
                bias += g;
            }
            gb3[j] = bias;
        }

        /* Through W3 and the second leaky ReLU. */
        memset(gb2, 0, (size_t)h * sizeof(REAL));
        for (int64_t i = 0; i < n; i++) {
            REAL *gi = g_a2 + i * h;
            const REAL *hi = h2 + i * h;
            for (int64_t o = 0; o < h; o++)
                gi[o] = 0;
            for (int64_t jj = 0; jj < nf; jj++) {
                REAL g = go[i * nf + jj];
                const REAL *w = w3 + (1 - parity + 2 * jj) * h;
                for (int64_t o = 0; o < h; o++)
                    gi[o] += g * w[o];
            }
            for (int64_t o = 0; o < h; o++) {
                gi[o] = hi[o] > 0 ? gi[o] : gi[o] * slope;
                gb2[o] += gi[o];
            }
        }

        /* W2's gradient, and through W2 and the first leaky ReLU. */
        FN(gemm)(PLAIN, h, h, n, g_a2, 1, h, h1, h, gw2, h, NULL, slope, NULL);
        FN(gemm)(LEAKY_GRAD, n, h, h, g_a2, h, 1, w2, h, g_a1, h, NULL, slope, h1);

        /* First layer: only its kept columns read the input. */
        memset(gb1, 0, (size_t)h * sizeof(REAL));
        memset(g_w1k, 0, (size_t)(nk * h) * sizeof(REAL));
        for (int64_t i = 0; i < n; i++) {
            const REAL *gi = g_a1 + i * h;
            for (int64_t o = 0; o < h; o++)
                gb1[o] += gi[o];
            for (int64_t kk = 0; kk < nk; kk++) {
                REAL xi = x[i * d + parity + 2 * kk];
                REAL *row = g_w1k + kk * h;
                for (int64_t o = 0; o < h; o++)
                    row[o] += gi[o] * xi;
                g_x[i * d + parity + 2 * kk] += FN(dot)(gi, sv->w1k[net] + kk * h, h);
            }
        }
        memset(gw1, 0, (size_t)(h * d) * sizeof(REAL));
        for (int64_t kk = 0; kk < nk; kk++)
            for (int64_t o = 0; o < h; o++)
                gw1[o * d + parity + 2 * kk] = g_w1k[kk * h + o];
    }
}

/* torch's lerp: start + w (end - start), or end - (1 - w)(end - start) for w of 1/2 or more. */
static inline REAL FN(lerp)(REAL start, REAL end, REAL w)
{
    return w < (REAL)0.5 ? start + w * (end - start) : end - (end - start) * (1 - w);
}

/* Batch norm forward; in training mode with batch statistics, which it records. */
CLONES static void FN(batchnorm_forward)(
    const Record *rec, const double *k, Saved *sv, const REAL *x, REAL *y, REAL *log_det,
    int64_t n, int training)
{
    int64_t d = rec->dim;
    REAL momentum = (REAL)k[1], eps = (REAL)k[2];
    const REAL *log_gamma = (const REAL *)rec->value[0], *beta = (const REAL *)rec->value[1];
    REAL *running_mean = (REAL *)rec->buffer[0], *running_var = (REAL *)rec->buffer[1];
    REAL *batch_mean = (REAL *)rec->buffer[2], *batch_var = (REAL *)rec->buffer[3];
    REAL total = 0;

    for (int64_t c = 0; c < d; c++) {
        REAL mean, var;
        if (training) {
            double sum = 0, squares = 0;
            for (int64_t i = 0; i < n; i++)
                sum += x[i * d + c];
            mean = (REAL)(sum / n);
            for (int64_t i = 0; i < n; i++) {
                double centred = (double)x[i * d + c] - (double)mean;
                squares += centred * centred;
            }
            var = (REAL)(squares / n);
            batch_mean[c] = mean;
            batch_var[c] = var;
            running_mean[c] = FN(lerp)(running_mean[c], mean, momentum);
            running_var[c] = FN(lerp)(running_var[c], var, momentum);
        } else {
            mean = running_mean[c];
            var = running_var[c];
        }
        REAL log_scale = log_gamma[c] - (REAL)0.5 * R_LOG(var + eps);
        REAL scale = R_EXP(log_scale);
        sv->mean[c] = mean;
        sv->inv_std[c] = 1 / R_SQRT(var + eps);
        for (int64_t i = 0; i < n; i++)
            y[i * d + c] = (x[i * d + c] - mean) * scale + beta[c];
        total += log_scale;
    }
    for (int64_t i = 0; i < n; i++)
        log_det[i] += total;
}

CLONES static void FN(batchnorm_backward)(
    const Record *rec, const Saved *sv, const REAL *g_y, REAL g_ld, REAL *g_x, int64_t n,
    int training)
{
    int64_t d = rec->dim;
    const REAL *log_gamma = (const REAL *)rec->value[0];
    REAL *g_log_gamma = (REAL *)rec->grad[0], *g_beta = (REAL *)rec->grad[1];
    const REAL *x = sv->x;
    REAL total_ld = g_ld * (REAL)n;

    for (int64_t c = 0; c < d; c++) {
        REAL mean = sv->mean[c], inv_std = sv->inv_std[c], gamma = R_EXP(log_gamma[c]);
        double sum_g = 0, sum_gx = 0;
        for (int64_t i = 0; i < n; i++) {
            REAL g = g_y[i * d + c];
            sum_g += g;
            sum_gx += g * ((x[i * d + c] - mean) * inv_std);
        }
        g_beta[c] = (REAL)sum_g;
        g_log_gamma[c] = (REAL)sum_gx * gamma + total_ld;

        if (!training) {
            for (int64_t i = 0; i < n; i++)
                g_x[i * d + c] = g_y[i * d + c] * gamma * inv_std;
            continue;
        }
        /* The batch mean and variance depend on every row, and so does the log-det. */
        REAL mean_g = (REAL)(sum_g / n) * gamma;
        REAL centred = (REAL)(sum_gx / n) * gamma + total_ld / (REAL)n;
        for (int64_t i = 0; i < n; i++) {
            REAL x_hat = (x[i * d + c] - mean) * inv_std;
            g_x[i * d + c] = inv_std * (g_y[i * d + c] * gamma - mean_g - x_hat * centred);
        }
    }
}

CLONES static void FN(planar_forward)(
    const Record *rec, Saved *sv, const REAL *x, REAL *y, REAL *log_det, int64_t n)
{
    int64_t d = rec->dim;
    const REAL *w = (const REAL *)rec->value[0];
    REAL b = ((const REAL *)rec->value[2])[0];

    for (int64_t i = 0; i < n; i++) {
        const REAL *xi = x + i * d;
        REAL *yi = y + i * d;
        REAL a = b;
        for (int64_t c = 0; c < d; c++)
            a += xi[c] * w[c];
        REAL t = R_TANH(a);
        for (int64_t c = 0; c < d; c++)
            yi[c] = xi[c] + sv->u_hat[c] * t;
        sv->tanh_a[i] = t;
        log_det[i] += R_LOG1P((1 - t * t) * sv->c);
    }
}

CLONES static void FN(planar_backward)(
    const Record *rec, const Saved *sv, const REAL *g_y, REAL g_ld, REAL *g_x, int64_t n)
{
    int64_t d = rec->dim;
    const REAL *w = (const REAL *)rec->value[0], *u = (const REAL *)rec->value[1];
    REAL *g_w = (REAL *)rec->grad[0], *g_u = (REAL *)rec->grad[1], *g_b = (REAL *)rec->grad[2];
    const REAL *x = sv->x, *u_hat = sv->u_hat;
    REAL c = sv->c;
    REAL g_c = 0, g_bias = 0;
    REAL g_u_hat[d], g_weight[d];

    for (int64_t e = 0; e < d; e++)
        g_u_hat[e] = g_weight[e] = 0;
    /* log_det = log(1 + q c) with q = 1 - tanh(a)^2, a = w^T x + b. */
    for (int64_t i = 0; i < n; i++) {
        const REAL *gi = g_y + i * d, *xi = x + i * d;
        REAL t = sv->tanh_a[i], q = 1 - t * t, denominator = 1 + q * c;
        REAL g_t = -2 * g_ld * t * c / denominator;
        g_c += g_ld * q / denominator;
        for (int64_t e = 0; e < d; e++)
            g_t += gi[e] * u_hat[e];
        REAL g_a = g_t * q;
        for (int64_t e = 0; e < d; e++) {
            g_x[i * d + e] = gi[e] + g_a * w[e];
            g_u_hat[e] += t * gi[e];
            g_weight[e] += g_a * xi[e];
        }
        g_bias += g_a;
    }

    /* u_hat = u + coef w, coef = (softplus(wu) - 1 - wu) / ww, and c = w^T u_hat. */
    REAL g_coef = 0;
    for (int64_t e = 0; e < d; e++) {
        g_u_hat[e] += g_c * w[e];
        g_weight[e] += g_c * u_hat[e];
        g_coef += g_u_hat[e] * w[e];
    }
    REAL sigmoid = 1 / (1 + R_EXP(-sv->wu));
    REAL g_wu = g_coef * (sigmoid - 1) / sv->ww;
    REAL g_ww = -g_coef * sv->coef / sv->ww;
    for (int64_t e = 0; e < d; e++) {
        g_w[e] = g_weight[e] + sv->coef * g_u_hat[e] + g_wu * u[e] + 2 * g_ww * w[e];
        g_u[e] = g_u_hat[e] + g_wu * w[e];
    }
    g_b[0] = g_bias;
}

/* One segment forward: y and the log-dets from x. */
static void FN(segment_forward)(
    const Record *rec, const double *k, Saved *sv, const REAL *x, REAL *y, REAL *log_det,
    int64_t n, int training)
{
    sv->x = (REAL *)x;
    if (rec->op == OP_COUPLING)
        FN(coupling_forward)(rec, k, sv, x, y, log_det, n);
    else if (rec->op == OP_BATCHNORM)
        FN(batchnorm_forward)(rec, k, sv, x, y, log_det, n, training);
    else
        FN(planar_forward)(rec, sv, x, y, log_det, n);
}

/* log p(x) = log N(z; 0, I) + log-det, per row. */
static void FN(finish)(const REAL *z, const REAL *log_det, REAL *log_p, int64_t n, int64_t d)
{
    REAL constant = (REAL)(0.5 * (double)d * log(2.0 * M_PI));
    for (int64_t i = 0; i < n; i++) {
        REAL squares = 0;
        for (int64_t c = 0; c < d; c++)
            squares += z[i * d + c] * z[i * d + c];
        log_p[i] = -(REAL)0.5 * squares - constant + log_det[i];
    }
}

/* The log-density of n rows, in blocks of BLOCK rows that keep the activations in cache. */
static int64_t FN(log_prob)(
    const Record *program, const double *constants, int64_t segments, const REAL *x, int64_t n,
    REAL *log_p, void *workspace, int64_t workspace_bytes, int training)
{
    int64_t d = program[0].dim;
    int64_t block = training ? n : (n < BLOCK ? n : BLOCK);
    Arena arena = {workspace, 0, workspace_bytes};
    Saved *saved = (Saved *)arena_take(&arena, segments * (int64_t)sizeof(Saved));
    REAL *log_det = FN(take)(&arena, block);
    REAL *ping = FN(take)(&arena, block * d), *pong = FN(take)(&arena, block * d);
    Saved measuring;
    for (int64_t s = 0; s < segments; s++)
        FN(prepare)(&program[s], workspace ? &saved[s] : &measuring, block, &arena);
    if (!workspace)
        return arena.used;

    for (int64_t start = 0; start < n; start += block) {
        int64_t rows = n - start < block ? n - start : block;
        const REAL *in = x + start * d;
        memset(log_det, 0, (size_t)rows * sizeof(REAL));
        for (int64_t s = 0; s < segments; s++) {
            REAL *out = s % 2 ? pong : ping;
            FN(segment_forward)(
                &program[s], constants + 3 * s, &saved[s], in, out, log_det, rows, training);
            in = out;
        }
        FN(finish)(in, log_det, log_p + start, rows, d);
    }
    return arena.used;
}

/* The mean negative log-likelihood of n rows, its gradient written to every parameter's grad,
 * then clipped to norm clip. Returns the workspace bytes it needs when workspace is NULL. */
static int64_t FN(loss_backward)(
    const Record *program, const double *constants, int64_t segments, const REAL *x, int64_t n,
    void *workspace, int64_t workspace_bytes, int training, double clip, double *result)
{
    int64_t d = program[0].dim;
    Arena arena = {workspace, 0, workspace_bytes};
    Saved *saved = (Saved *)arena_take(&arena, segments * (int64_t)sizeof(Saved));
    REAL *log_det = FN(take)(&arena, n);
    REAL *log_p = FN(take)(&arena, n);
    REAL *stages = FN(take)(&arena, segments * n * d);
    REAL *g = FN(take)(&arena, n * d), *g_next = FN(take)(&arena, n * d);
    Scratch scratch;
    FN(reserve_scratch)(program, segments, n, &scratch, &arena);
    Saved measuring;
    for (int64_t s = 0; s < segments; s++)
        FN(prepare)(&program[s], workspace ? &saved[s] : &measuring, n, &arena);
    if (!workspace)
        return arena.used;

    /* Forward, keeping every stage. */
    memset(log_det, 0, (size_t)n * sizeof(REAL));
    const REAL *in = x;
    for (int64_t s = 0; s < segments; s++) {
        REAL *out = stages + s * n * d;
        FN(segment_forward)(
            &program[s], constants + 3 * s, &saved[s], in, out, log_det, n, training);
        in = out;
    }
    FN(finish)(in, log_det, log_p, n, d);
    double total = 0;
    for (int64_t i = 0; i < n; i++)
        total += log_p[i];
    result[0] = -total / (double)n;

    /* Backward from the loss -mean(log p): its gradient in z is z / n, in each log-det -1 / n. */
    for (int64_t i = 0; i < n * d; i++)
        g[i] = in[i] / (REAL)n;
    REAL g_ld = -(REAL)1 / (REAL)n;
    for (int64_t s = segments - 1; s >= 0; s--) {
        const Record *rec = &program[s];
        if (rec->op == OP_COUPLING)
            FN(coupling_backward)(rec, constants + 3 * s, &saved[s], g, g_ld, g_next, n, &scratch);
        else if (rec->op == OP_BATCHNORM)
            FN(batchnorm_backward)(rec, &saved[s], g, g_ld, g_next, n, training);
        else
            FN(planar_backward)(rec, &saved[s], g, g_ld, g_next, n);
        REAL *swap = g;
        g = g_next;
        g_next = swap;
    }

    /* The gradient's norm, then clipping as torch.nn.utils.clip_grad_norm_ does. */
    double squares = 0;
    for (int64_t s = 0; s < segments; s++)
        for (int p = 0; p < PARAMETERS; p++)
            if (program[s].grad[p])
                for (int64_t e = 0; e < program[s].numel[p]; e++) {
                    double v = ((const REAL *)program[s].grad[p])[e];
                    squares += v * v;
                }
    double norm = sqrt(squares);
    result[1] = norm;
    REAL factor = (REAL)(clip / (norm + 1e-6));
    if (factor < 1)
        for (int64_t s = 0; s < segments; s++)
            for (int p = 0; p < PARAMETERS; p++)
                if (program[s].grad[p])
                    for (int64_t e = 0; e < program[s].numel[p]; e++)
                        ((REAL *)program[s].grad[p])[e] *= factor;
    return arena.used;
}

#undef Saved
#undef Scratch
#undef VEC
#undef MASK
#undef NR
#undef FN
